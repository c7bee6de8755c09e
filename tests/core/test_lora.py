"""LoRA: files written by peft / diffusers, our merge against diffusers' `load_lora_weights` +
`fuse_lora` (weights and frames), nothing sticking to the model, refusals, the node and the CLI.

Tolerance for frames: max |Δ| <= 1e-4 in fp32, as tests/core/test_parity.py.
"""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers import ConsisIDPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main
from consisid_core.errors import ConsisIDError
from consisid_core.identity import save_identity
from consisid_core.lora import MAX_TENSORS, check_lora_fits, lora_argument, merged, read_lora, with_loras
from consisid_core.media import to_uint8
from consisid_core.sampling import generate, sample
from consisid_core.tiny import random_identity
from refusals import assert_refused

peft = pytest.importorskip("peft")

TOLERANCE = 1e-4
PROMPT = "a woman smiling in a sunny park"
NEGATIVE = "blurry"
STYLE = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
"""The attention layers the CogVideoX and ConsisID trainers target (and the final projection)."""
FACE = ["perceiver_cross_attention.0.to_q", "perceiver_cross_attention.1.to_kv", "perceiver_cross_attention.1.to_out",
        "layers.1.0.to_q", "layers.2.0.to_kv", "mapping_0.3", "id_embedding_mapping.6"]
"""Layers of the face layers: the perceiver cross-attention and the Local Facial Extractor."""


def _write(tiny_dir, folder, name, targets, seed, rank=4, alpha=8.0, metadata=True, **config):
    """A LoRA as the trainers write it: peft's adapter on the transformer (random A and B), its state
    dict from `get_peft_model_state_dict`, saved by diffusers' `save_lora_weights` (with the
    LoraConfig as header metadata, as today's trainers do, or without, as older ones did)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = Checkpoint.open(tiny_dir).load_transformer("fp32")
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config)
    )
    ConsisIDPipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=name,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict() if metadata else None,
    )
    return folder / name


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    made = {
        # no metadata (older trainers): scale 1 whatever alpha was
        "plain": _write(tiny_dir, folder, "plain.safetensors", STYLE, seed=1, alpha=16.0, metadata=False),
        # metadata: alpha / r, a rank and an alpha of their own for some layers; face layers
        "face": _write(tiny_dir, folder, "face.safetensors", STYLE + FACE, seed=2, rank=4, alpha=6.0,
                       rank_pattern={"perceiver_cross_attention.1.to_kv": 2, "^transformer_blocks.0.attn1.to_q": 3},
                       alpha_pattern={"to_v": 2.0}),
        "rslora": _write(tiny_dir, folder, "rslora.safetensors", ["to_k", "ff.net.2"], seed=3, alpha=3.0,
                         use_rslora=True),
    }
    plain = load_file(made["plain"])
    # ComfyUI's layout: the same tensors under diffusion_model.
    made["comfy"] = folder / "comfy.safetensors"
    save_file({"diffusion_model." + k.removeprefix("transformer."): v for k, v in plain.items()}, made["comfy"])
    # kohya-style alpha tensors (ComfyUI reads alpha / rank; diffusers does not read these files)
    made["alpha"] = folder / "alpha.safetensors"
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in plain if k.endswith(".lora_A.weight")}
    save_file(plain | alphas, made["alpha"])
    return made


def _fresh(tiny_dir, fp8=False):
    return Checkpoint.open(tiny_dir).load_model("fp32", fp8=fp8)


@pytest.fixture(scope="module")
def model(tiny_dir):
    """One model for the tests that must leave it as it was (each checks that it did)."""
    return _fresh(tiny_dir)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.transformer.state_dict().items()}


def _unchanged(model, before: dict) -> bool:
    after = model.transformer.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _reference_pipe(tiny_dir, loras, lora_scale=1.0):
    """diffusers' own: ConsisIDPipeline, each file through `load_lora_weights` as an adapter,
    `set_adapters` with the strengths, then `fuse_lora(lora_scale=…)`."""
    pipe = ConsisIDPipeline.from_pretrained(tiny_dir, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, [weight for _, weight in loras])
    pipe.fuse_lora(lora_scale=lora_scale)
    return pipe


def _fused_weights(pipe) -> dict:
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("layout", ["plain", "face", "rslora"])
def test_merged_weights_equal_diffusers_fused_weights(tiny_dir, files, model, layout):
    theirs = _fused_weights(_reference_pipe(tiny_dir, [(files[layout], 1.0)], lora_scale=0.7))
    before = _state(model)
    with merged(model.transformer, ((read_lora(files[layout]), 0.7),)):
        ours = model.transformer.state_dict()
        assert ours.keys() == theirs.keys()
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
        changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert _unchanged(model, before)
    lora = read_lora(files[layout])
    assert sorted(changed) == sorted(f"{name}.weight" for name in lora.layers)
    if layout == "face":  # both face layers are reached
        assert any(k.startswith("perceiver_cross_attention.") for k in changed)
        assert any(k.startswith("local_facial_extractor.") for k in changed)


def test_scales_follow_the_metadata_as_diffusers_reads_it(files):
    plain, face, rslora = (read_lora(files[k]).layers for k in ("plain", "face", "rslora"))
    assert {layer.scale for layer in plain.values()} == {1.0}  # no metadata: alpha == rank
    assert face["transformer_blocks.1.attn1.to_q"].scale == 6.0 / 4
    assert face["transformer_blocks.0.attn1.to_q"].rank == 3 and face["transformer_blocks.0.attn1.to_q"].scale == 2.0
    assert face["transformer_blocks.1.attn1.to_v"].scale == 2.0 / 4
    kv = face["perceiver_cross_attention.1.to_kv"]
    assert kv.rank == 2 and kv.scale == 3.0
    assert {layer.scale for layer in rslora.values()} == {3.0 / 2}


def test_comfyui_prefix_and_alpha_tensors(files, model):
    plain, comfy, alpha = (read_lora(files[k]) for k in ("plain", "comfy", "alpha"))
    with merged(model.transformer, ((plain, 0.9),)):
        expected = _state(model)
    with merged(model.transformer, ((comfy, 0.9),)):
        assert _unchanged(model, expected)
    # alpha 2 at rank 4: half the update, as ComfyUI reads such a file
    with merged(model.transformer, ((plain, 0.45),)):
        expected = _state(model)
    with merged(model.transformer, ((alpha, 0.9),)):
        assert _unchanged(model, expected)


def _identity(tiny_dir):
    return random_identity(Checkpoint.open(tiny_dir).transformer_config, seed=21)


def _reference_frames(pipe, identity, steps, seed) -> torch.Tensor:
    out = pipe(
        image=identity.face_image_pil(), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
        guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(seed), id_cond=identity.id_cond,
        id_vit_hidden=list(identity.id_vit_hidden), kps_cond=identity.kps.numpy(), output_type="pt",
        height=64, width=96, num_frames=9,
    ).frames
    return out[0].permute(0, 2, 3, 1)


def _latents(model, identity, text, seed):
    return sample(model, identity, text, steps=2, seed=seed)


@pytest.mark.slow
def test_frames_with_a_face_lora_equal_diffusers_fuse_lora(tiny_dir, files, text):
    identity = _identity(tiny_dir)
    model = _fresh(tiny_dir)
    before = _state(model)
    styled = with_loras(model, [(read_lora(files["face"]), 0.7)])
    ours = generate(styled, identity, PROMPT, NEGATIVE, steps=2, seed=5)
    theirs = _reference_frames(_reference_pipe(tiny_dir, [(files["face"], 1.0)], lora_scale=0.7), identity, 2, 5)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert _unchanged(model, before)
    # the LoRA shows, and nothing of it stuck: after a run with it, a run without it equals a run on a
    # freshly loaded model, bit for bit
    with_lora = _latents(styled, identity, text, 5)
    without = _latents(model, identity, text, 5)
    assert (with_lora - without).abs().max().item() > 100 * TOLERANCE
    assert torch.equal(without, _latents(_fresh(tiny_dir), identity, text, 5))


@pytest.mark.slow
def test_two_stacked_loras_equal_diffusers_two_adapters(tiny_dir, files, text):
    identity = _identity(tiny_dir)
    stack = [(files["plain"], 0.6), (files["face"], -0.4)]
    model = with_loras(_fresh(tiny_dir), [(read_lora(path), weight) for path, weight in stack])
    ours = generate(model, identity, PROMPT, NEGATIVE, steps=2, seed=8)
    theirs = _reference_frames(_reference_pipe(tiny_dir, stack), identity, 2, 8)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    one = dataclasses.replace(model, loras=model.loras[:1])  # the second LoRA counts
    assert (_latents(one, identity, text, 8) - _latents(model, identity, text, 8)).abs().max().item() > 100 * TOLERANCE


@pytest.mark.slow
def test_fp8_storage_merges_in_fp8_and_restores_it(tiny_dir, files, identity, text):
    model = _fresh(tiny_dir, fp8=True)
    before = _state(model)
    lora = read_lora(files["plain"])
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert before[name].dtype == torch.float8_e4m3fn
    with merged(model.transformer, ((lora, 1.0),)):
        assert model.transformer.state_dict()[name].dtype == torch.float8_e4m3fn
        assert not torch.equal(model.transformer.state_dict()[name].float(), before[name].float())
    assert _unchanged(model, before)
    with merged(model.transformer, ((lora, 0.0),)):  # the fp8 round trip of a zero update loses nothing
        assert _unchanged(model, before)
    runs = [generate(with_loras(model, loras), identity, text, steps=2, seed=3)
            for loras in ([], [(lora, 1.0)], [])]
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])


@pytest.mark.slow
def test_sequential_offload_runs_with_the_loras_and_restores_the_weights(tiny_dir, files, identity, text):
    from consisid_core.performance import Performance

    model = _fresh(tiny_dir)
    before = _state(model)
    styled = with_loras(model, [(read_lora(files["face"]), 0.7)])
    whole = sample(styled, identity, text, steps=2, seed=2, device="cpu")
    sequential = Performance(offload="sequential")
    streamed = sample(styled, identity, text, steps=2, seed=2, device="cpu", performance=sequential)
    assert torch.equal(whole, streamed)
    assert _unchanged(model, before)


def test_an_error_mid_run_leaves_the_weights_as_they_were(files, model):
    before = _state(model)
    with pytest.raises(RuntimeError, match="stop"):
        with merged(model.transformer, ((read_lora(files["face"]), 1.0),)):
            assert not _unchanged(model, before)
            raise RuntimeError("stop")
    assert _unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# refusals: one line naming the file and the first key that does not fit; the model unchanged


def _refused(model, path, *expected):
    before = _state(model)
    message = assert_refused(lambda: with_loras(model, [(read_lora(path), 1.0)]), re.escape(path.name))
    for part in expected:
        assert part in message, message
    assert _unchanged(model, before)
    return message


def test_a_pickle_is_refused_whatever_its_name(model, tmp_path, files):
    path = tmp_path / "pickled.safetensors"
    torch.save(load_file(files["plain"]), path)
    _refused(model, path, "pickled PyTorch weights, which are never loaded")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _refused(model, garbage, "not a readable .safetensors file")


def test_a_lora_for_another_architecture_is_refused(model, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4)}, path)
    _refused(model, path, "'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'", "diffusers layout")
    other = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(64, 4)}, other)
    _refused(model, other, "none of its 1 layers is in this ConsisID transformer",
             "'transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight'")


def test_a_shape_that_does_not_fit_is_refused_before_any_weight_changes(model, tmp_path, files):
    tensors = load_file(files["plain"])
    # the last layer (in key order) of another width: the layers before it fit
    last = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[-1]
    tensors[last] = torch.ones(4, 1920)
    path = tmp_path / "cogvideox-2b.safetensors"
    save_file(tensors, path)
    _refused(model, path, f"'{last}' is for a layer of 1920 inputs", "it is for another model")
    before = _state(model)
    lora = read_lora(path)
    with pytest.raises(ConsisIDError, match="1920 inputs"):
        with merged(model.transformer, ((read_lora(files["face"]), 1.0), (lora, 1.0))):
            pass
    assert _unchanged(model, before)


def test_ranks_that_disagree_are_refused(model, tmp_path, files):
    tensors = load_file(files["plain"])
    key = "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight"
    tensors[key] = torch.ones(64, 3)
    path = tmp_path / "ranks.safetensors"
    save_file(tensors, path)
    _refused(model, path, "[4, 64]", "[64, 3]", "not the [rank, in] and [out, rank] matrices")
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})}
    save_file(load_file(files["plain"]), path, metadata=metadata)
    _refused(model, path, "its metadata gives", "rank 8, its tensors have rank 4")


def test_other_file_kinds_are_refused(model, tmp_path, files):
    plain = load_file(files["plain"])
    cases = {
        "dora.safetensors": (plain | {"transformer.proj_out.lora_magnitude_vector": torch.ones(16)},
                             "belongs to a DoRA"),
        "bias.safetensors": (plain | {"transformer.transformer_blocks.0.attn1.to_k.lora_B.bias": torch.ones(64)},
                             "is not a layer's lora_A.weight, lora_B.weight or alpha"),
        "half.safetensors": ({k: v for k, v in plain.items() if "to_k.lora_B" not in k},
                             "has no lora_B.weight beside it"),
        "text.safetensors": (plain | {"text_encoder.encoder.block.0.q.lora_A.weight": torch.ones(4, 32)},
                             "does not begin with transformer. or diffusion_model."),
        "ints.safetensors": ({k: v.to(torch.int32) for k, v in plain.items()}, "holds int32 values, not floats"),
        "nan.safetensors": (plain | {"transformer.proj_out.lora_A.weight": torch.full((4, 64), float("nan"))}, "NaN"),
        "empty.safetensors": ({}, "holds no tensors"),
    }
    for name, (tensors, expected) in cases.items():
        save_file(tensors, tmp_path / name)
        _refused(model, tmp_path / name, expected)
    dora = {"lora_adapter_metadata": json.dumps({"transformer.use_dora": True})}
    save_file(plain, tmp_path / "dora2.safetensors", metadata=dora)
    _refused(model, tmp_path / "dora2.safetensors", "it is a DoRA")


def test_files_beyond_the_bounds_are_refused_unread(model, tmp_path):
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:  # sparse: nothing is written, the size is what counts
        f.truncate(9 * 2**30)
    _refused(model, huge, "over the 8 GB")
    many = tmp_path / "many.safetensors"
    save_file({f"transformer.x{i}.alpha": torch.ones(1) for i in range(MAX_TENSORS + 1)}, many)
    _refused(model, many, f"over the {MAX_TENSORS}")


def test_strengths_are_checked(files, model):
    for strength in (float("nan"), 1e9):
        with pytest.raises(ConsisIDError, match="LoRA strength"):
            with_loras(model, [(read_lora(files["plain"]), strength)])
    assert lora_argument("a/b.safetensors:0.5") == (lora_argument("a/b.safetensors")[0], 0.5)
    assert lora_argument("C:/x/b.safetensors") == (lora_argument("C:/x/b.safetensors")[0], 1.0)


def test_check_lora_fits_names_a_missing_layer(files, model, tmp_path):
    tensors = load_file(files["plain"]) | {
        "transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.ones(4, 64),
        "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.ones(64, 4),
    }
    save_file(tensors, tmp_path / "deeper.safetensors")
    with pytest.raises(ConsisIDError, match=r"'transformer.transformer_blocks.7.attn1.to_q.lora_A.weight' names no"):
        check_lora_fits(read_lora(tmp_path / "deeper.safetensors"), model.transformer)


# ---------------------------------------------------------------------------------------------
# the node outside ComfyUI, and the command line


@pytest.mark.slow
def test_lora_nodes_stack_and_leave_the_loaders_model_alone(home, tiny_dir, files, identity, text):
    import shutil

    from workflow_tools import import_pack

    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    (home / "models" / "loras").mkdir()
    for name in ("plain", "face"):
        shutil.copy(files[name], home / "models" / "loras")
    node = NODE_CLASS_MAPPINGS["ConsisIDLoRA"]
    assert node.INPUT_TYPES()["required"]["lora_name"][0] == ["face.safetensors", "plain.safetensors"]
    assert node.VALIDATE_INPUTS(lora_name="face.safetensors", strength=-0.5) is True
    assert "is not one of the choices" in node.VALIDATE_INPUTS(lora_name="../plain.safetensors", strength=1.0)
    assert "must be a number from -100" in node.VALIDATE_INPUTS(lora_name="face.safetensors", strength=1e3)
    (model,) = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    (styled,) = node().apply(model, "plain.safetensors", 0.6)
    (styled,) = node().apply(styled, "face.safetensors", -0.4)
    sampler = NODE_CLASS_MAPPINGS["ConsisIDSampler"]()
    settings = dict(seed=4, steps=2, cfg=6.0, dynamic_cfg=False, scheduler="dpm", length=9, width=96, height=64,
                    identity_strength=1.0)
    (ours,) = sampler.sample(styled, identity, text, **settings)
    stack = [(read_lora(files["plain"]), 0.6), (read_lora(files["face"]), -0.4)]
    core = generate(with_loras(_fresh(tiny_dir), stack), identity, text, steps=2, seed=4)
    from consisid_pack.nodes.vae import ConsisIDVAEDecode

    (frames,) = ConsisIDVAEDecode().decode(styled, ours, False, 240, 360, 40, False, 72)
    assert torch.equal(frames, core)
    # the loader's model, used after the LoRAs' run, samples as a freshly loaded one
    (after,) = sampler.sample(model, identity, text, **settings)
    (fresh,) = sampler.sample(_fresh(tiny_dir), identity, text, **settings)
    assert torch.equal(after["samples"], fresh["samples"])


def test_lora_node_reads_nothing_outside_models_loras(home, files, sentinels):
    from workflow_tools import import_pack

    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    outside = sentinels.make("outside.safetensors", files["plain"].read_bytes())
    (home / "models" / "loras").mkdir()
    for name in ("../../" + outside.name, str(outside), "../outside.safetensors"):
        with pytest.raises(ValueError):  # refused at the name, before any file or the model is used
            NODE_CLASS_MAPPINGS["ConsisIDLoRA"]().apply(None, name, 1.0)


@pytest.mark.slow
def test_cli_lora_option(tiny_dir, files, tmp_path):
    identity_file = save_identity(_identity(tiny_dir), tmp_path / "me.safetensors")
    out = tmp_path / "frames"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", PROMPT,
            "--steps", "2", "--seed", "6"]
    assert main(args + ["--lora", f"{files['plain']}:0.6", "--lora", str(files["face"]), "--out", str(out)]) == 0
    written = np.stack([np.asarray(Image.open(f)) for f in sorted(out.iterdir())])
    stack = [(read_lora(files["plain"]), 0.6), (read_lora(files["face"]), 1.0)]
    expected = to_uint8(generate(with_loras(_fresh(tiny_dir), stack), _identity(tiny_dir), PROMPT, steps=2, seed=6))
    assert np.array_equal(written, expected)


def test_cli_refuses_a_bad_lora_before_any_work(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({f"transformer.nothing.lora_{x}.weight": torch.ones(2, 2) for x in "AB"}, bad)
    out = tmp_path / "out.mp4"
    for lora, expected in ((f"{bad}:0.5", "none of its 1 layers"), (f"{bad}:nan", "LoRA strength nan"),
                           (str(tmp_path / "missing.safetensors"), "does not exist")):
        code = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--lora", lora, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
        assert not out.exists()
