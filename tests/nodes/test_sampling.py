"""The nodes outside ComfyUI: declarations ComfyUI's loader accepts, and a whole graph run by hand."""

import inspect
import shutil

import numpy as np
import pytest
import torch

from workflow_tools import import_pack  # noqa: E402

pack = import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

EXPECTED = {
    "ConsisIDFaceModelsLoader", "ConsisIDFaceEmbed", "ConsisIDSaveIdentity", "ConsisIDLoadIdentity",
    "ConsisIDModelLoader", "ConsisIDTextEncode", "ConsisIDSampler", "ConsisIDPerformance", "ConsisIDVAEDecode",
    "ConsisIDIdentityScore", "ConsisIDExtend", "ConsisIDLoRA",
    "ConsisIDNativeModelLoader", "ConsisIDFaceModules", "ConsisIDTextConditioning", "ConsisIDIdentityConditioning",
    "ConsisIDNoise", "ConsisIDDPMSampler", "ConsisIDDynamicCFG", "ConsisIDNativeLoRA", "ConsisIDNativeVAEDecode",
    "ConsisIDStepCache", "ConsisIDSeed", "ConsisIDAppendSegment",
}


def test_the_pack_registers_nothing_outside_comfyui():
    assert pack.NODE_CLASS_MAPPINGS == {}


def test_every_node_is_declared_as_comfyui_expects(home):
    assert set(NODE_CLASS_MAPPINGS) == EXPECTED == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name.startswith("ConsisID")
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == cls.DISPLAY_NAME and cls.DISPLAY_NAME.startswith("ConsisID ")
        assert cls.CATEGORY == "ConsisID"
        assert cls.DESCRIPTION.strip()
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
        inputs = {}
        for group in spec.values():
            for input_name, declaration in group.items():
                kind, options = declaration
                assert isinstance(kind, (str, list)), (name, input_name)
                assert options.get("tooltip"), (name, input_name)
                if isinstance(kind, list) and "default" in options:
                    assert options["default"] in kind, (name, input_name)
                inputs[input_name] = declaration
        function = getattr(cls, cls.FUNCTION)
        params = inspect.signature(function).parameters
        assert set(params) - {"self"} == set(inputs), name
        assert isinstance(cls.RETURN_TYPES, tuple)
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (name, attr)
        if hasattr(cls, "VALIDATE_INPUTS"):
            assert set(inspect.signature(cls.VALIDATE_INPUTS).parameters) <= set(inputs), name
        assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False), name


def test_model_lists_come_from_the_model_folders(home):
    models = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"].INPUT_TYPES()["required"]
    assert models["model"][0] == ["tiny", "diffusion_models/tiny.safetensors"]
    assert models["vae"][0] == ["(from checkpoint)", "tiny.safetensors"]
    faces = NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"].INPUT_TYPES()["required"]
    assert faces["face_encoder"][0] == ["tiny"]


def test_validation_messages_name_the_value_and_the_fix(home):
    sampler = NODE_CLASS_MAPPINGS["ConsisIDSampler"]
    assert sampler.VALIDATE_INPUTS(length=49, width=720, height=480) is True
    assert "length 50 must be 4·k + 1" in sampler.VALIDATE_INPUTS(length=50, width=720, height=480)
    assert "width 100 must be a positive multiple of 16" in sampler.VALIDATE_INPUTS(length=49, width=100, height=480)
    loader = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]
    single = "diffusion_models/tiny.safetensors"
    assert "pick the CogVideoX VAE" in loader.VALIDATE_INPUTS(model=single, vae="(from checkpoint)")
    assert loader.VALIDATE_INPUTS(model=single, vae="tiny.safetensors") is True


def _image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255).unsqueeze(0)


@pytest.mark.slow
def test_a_whole_graph_equals_the_core(home, tiny_dir):
    skimage_data = pytest.importorskip("skimage.data")
    from consisid_core import Checkpoint, generate
    from consisid_core.face import extract_identity, load_face_models

    n = NODE_CLASS_MAPPINGS
    photo = skimage_data.astronaut()
    (face_models,) = n["ConsisIDFaceModelsLoader"]().load("tiny", "cpu", "cpu")
    identities, face, mask = n["ConsisIDFaceEmbed"]().embed(_image(photo), face_models, -1)
    assert len(identities) == 1 and face.shape == (1, 512, 512, 3) and mask.shape == (1, 512, 512)
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    (text,) = n["ConsisIDTextEncode"]().encode("an astronaut smiling", "blurry", model=model)
    (latent,) = n["ConsisIDSampler"]().sample(
        model, identities[0], text, 42, 3, 6.0, False, "dpm", 9, 96, 64, 1.0
    )
    assert latent["samples"].shape == (1, 4, 3, 8, 12)
    (frames,) = n["ConsisIDVAEDecode"]().decode(model, latent, False, 240, 360, 40, False, 72)
    assert frames.shape == (9, 64, 96, 3)

    core_model = Checkpoint.open(tiny_dir).load_model("fp32")
    core_identity = extract_identity(load_face_models(tiny_dir / "face_encoder"), photo).identity
    expected = generate(core_model, core_identity, "an astronaut smiling", "blurry", steps=3, seed=42)
    assert (frames - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_identity_files_round_trip_and_first_frame_input(home, tiny_dir):
    from consisid_core.tiny import random_identity

    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    identity = random_identity(model.config, seed=2)
    result = n["ConsisIDSaveIdentity"]().save(identity, "people/me")
    saved = home / "output" / "people" / "me_00001_.safetensors"
    assert saved.is_file() and result["ui"]["text"] == [saved.name]
    n["ConsisIDSaveIdentity"]().save(identity, "people/me")
    assert (home / "output" / "people" / "me_00002_.safetensors").is_file()

    shutil.copy(saved, home / "input" / "me.safetensors")
    loader = n["ConsisIDLoadIdentity"]
    assert loader.INPUT_TYPES()["required"]["identity_file"][0] == ["me.safetensors"]
    assert "is not one of the identity files in the input folder" in loader.VALIDATE_INPUTS("gone.safetensors")
    loaded, face = loader().load("me.safetensors")
    assert torch.equal(loaded.id_cond, identity.id_cond)
    assert face.shape == (1, 64, 64, 3)

    width = model.config.text_embed_dim
    from consisid_core.text import TextEmbeddings

    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    sampler = n["ConsisIDSampler"]()
    args = (model, loaded, text, 1, 2, 6.0, False, "ddim", 9, 96, 64, 1.0)
    default = sampler.sample(*args)[0]["samples"]
    from_face = sampler.sample(*args, start_image=face)[0]["samples"]
    assert torch.equal(default, from_face)  # the face is the default first frame
    other = sampler.sample(*args, start_image=torch.rand(2, 64, 64, 3))[0]["samples"]
    assert not torch.equal(default, other)


def test_single_file_model_and_a_vae_file(home):
    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("diffusion_models/tiny.safetensors", "tiny.safetensors", "bf16", True)
    assert model.checkpoint is None and model.transformer.dtype == torch.bfloat16
    from consisid_pack.consisid_core.errors import ConsisIDError

    with pytest.raises(ConsisIDError, match="no T5 text encoder of its own: .* CLIPLoader"):
        n["ConsisIDTextEncode"]().encode("x", "", model=model)
    (with_vae,) = n["ConsisIDModelLoader"]().load("tiny", "tiny.safetensors", "fp32", False)
    assert with_vae.checkpoint is not None


def test_text_encode_needs_a_model_or_a_clip():
    from consisid_pack.consisid_core.errors import ConsisIDError

    with pytest.raises(ConsisIDError, match="connect a ConsisID model .* or a CLIP"):
        NODE_CLASS_MAPPINGS["ConsisIDTextEncode"]().encode("x", "")


@pytest.mark.slow
def test_tiled_decode_node(home):
    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    latent = {"samples": torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))}
    plain = n["ConsisIDVAEDecode"]().decode(model, latent, False, 32, 48, 16, False, 16)[0]
    tiled = n["ConsisIDVAEDecode"]().decode(model, latent, True, 32, 48, 16, True, 16)[0]
    assert plain.shape == tiled.shape == (9, 64, 96, 3)


@pytest.mark.slow
def test_performance_node_feeds_the_sampler(home):
    from consisid_pack.consisid_core.performance import Performance

    n = NODE_CLASS_MAPPINGS
    (options,) = n["ConsisIDPerformance"]().options(False, "sequential", 0.0)
    assert options == Performance(offload="sequential")
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    from consisid_pack.consisid_core.text import TextEmbeddings
    from consisid_pack.consisid_core.tiny import random_identity

    identity = random_identity(model.config, seed=5)
    width = model.config.text_embed_dim
    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    args = (model, identity, text, 1, 2, 6.0, False, "dpm", 9, 96, 64, 1.0)
    plain = n["ConsisIDSampler"]().sample(*args)[0]["samples"]
    streamed = n["ConsisIDSampler"]().sample(*args, performance=options)[0]["samples"]
    assert torch.equal(plain, streamed)
    (cached,) = n["ConsisIDPerformance"]().options(False, "model", 5.0)
    skipped = n["ConsisIDSampler"]().sample(*args[:4], 8, *args[5:], performance=cached)[0]["samples"]
    assert skipped.shape == plain.shape


@pytest.mark.slow
def test_the_sampler_checks_its_run_once(home, counted_calls):
    """ConsisID Sampler prepares its run once, before ComfyUI is asked for room: each check once."""
    from consisid_pack.consisid_core import sampling
    from consisid_pack.consisid_core.identity import Identity
    from consisid_pack.consisid_core.text import TextEmbeddings
    from consisid_pack.consisid_core.tiny import random_identity

    for name in ("resolve_size", "check_steps", "check_seed", "check_options", "check_sampling_fits"):
        counted_calls.watch(sampling, name)
    counted_calls.watch(Identity, "check_compatible")
    (model,) = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    width = model.config.text_embed_dim
    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    NODE_CLASS_MAPPINGS["ConsisIDSampler"]().sample(
        model, random_identity(model.config), text, 1, 1, 6.0, False, "ddim", 9, 96, 64, 1.0)
    assert counted_calls == {"resolve_size": 1, "check_steps": 1, "check_seed": 1, "check_compatible": 1, "check_options": 1,
                     "check_sampling_fits": 1}
