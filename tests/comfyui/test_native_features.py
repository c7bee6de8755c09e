"""What the wrapper has, on the native MODEL (in-process ComfyUI v0.33, CPU, the tiny native
checkpoint of test_native_parity): ConsisID Step Cache against the wrapper's TeaCache, the face
tokens once per run, MultiGPU CFG Split's deep clones, ConsisID Seed, native long videos."""

import contextlib
import logging
import re

import pytest
import torch

from native_tools import NEEDS_NATIVE
from native_parity import SAME_MODEL, SEED, TOLERANCE, native_latents, reference_latents, setup  # noqa: F401 (fixture)

pytestmark = [pytest.mark.comfyui, NEEDS_NATIVE]


@contextlib.contextmanager
def _fence_looks_again():
    """The fence checks this ComfyUI afresh for the block (an internal broken inside it) and after it."""
    from consisid_pack.nodes import fence

    fence.check.cache_clear()
    try:
        yield
    finally:
        fence.check.cache_clear()


def _counts(caplog, pattern: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(pattern, caplog.text)]


WRAPPER_COUNTS = r"step cache: (\d+) transformer forwards computed, (\d+) skipped"
NATIVE_COUNTS = r"ConsisID Step Cache: (\d+) transformer steps computed, (\d+) skipped"


# ---------------------------------------------------------------------------------------------
# ConsisID Step Cache


def test_step_cache_at_zero_and_below_every_steps_change_is_the_unpatched_model(setup, caplog):
    from consisid_pack.nodes.native.step_cache import ConsisIDStepCache

    plain = native_latents(setup, 5)
    (off,) = ConsisIDStepCache().patch(setup["model"], 0.0)
    assert off is not setup["model"] and torch.equal(native_latents(setup, 5, model=off), plain)
    # on the random tiny model every step's embedding changes by more than 0.1: the cache runs, skips nothing
    (on,) = ConsisIDStepCache().patch(setup["model"], 0.1)
    with caplog.at_level(logging.INFO):
        cached = native_latents(setup, 5, model=on)
    assert _counts(caplog, NATIVE_COUNTS) == [(5, 0)]
    assert torch.equal(cached, plain)
    assert torch.equal(native_latents(setup, 5), plain)  # the input MODEL is left as it was


@pytest.mark.parametrize("threshold, skipped", [(0.5, 2), (1.0, 5)])
def test_step_cache_skips_the_steps_the_wrappers_teacache_skips_with_its_latents(setup, caplog, threshold, skipped):
    """The same decisions as ConsisID Performance's step_cache on the same model and inputs (the
    counts), and the same video (so the same steps were skipped, reusing the same residuals)."""
    from consisid_core.performance import Performance
    from consisid_pack.nodes.native.comfy_parts import with_step_cache

    with caplog.at_level(logging.INFO):
        reference = reference_latents(setup, 10, performance=Performance(step_cache=threshold))
        native = native_latents(setup, 10, model=with_step_cache(setup["model"], threshold))
    assert _counts(caplog, WRAPPER_COUNTS) == _counts(caplog, NATIVE_COUNTS) == [(10 - skipped, skipped)]
    diff = (native - reference).abs().max().item()
    print(f"step cache {threshold}: {skipped} of 10 skipped, max |native - wrapper| {diff:.1e}")
    assert diff <= TOLERANCE
    assert (native - native_latents(setup, 10)).abs().max() > 1e-3  # skipping did change the video


def test_step_cache_with_the_reference_dpm_sampler_matches_the_wrapper(setup, caplog):
    from consisid_core.performance import Performance
    from consisid_pack.nodes.native.comfy_parts import with_step_cache
    from consisid_pack.nodes.native.nodes import ConsisIDDPMSampler

    (sampler,) = ConsisIDDPMSampler().get_sampler(SEED)
    with caplog.at_level(logging.INFO):
        reference = reference_latents(setup, 10, scheduler="dpm", performance=Performance(step_cache=1.0))
        native = native_latents(setup, 10, sampler=sampler, model=with_step_cache(setup["model"], 1.0))
    wrapper_counts, native_counts = _counts(caplog, WRAPPER_COUNTS), _counts(caplog, NATIVE_COUNTS)
    assert wrapper_counts == native_counts and native_counts[0][1] > 0
    assert (native - reference).abs().max().item() <= TOLERANCE


def test_step_cache_refuses_what_it_cannot_take_in_one_line(setup):
    from consisid_pack.nodes.native.comfy_parts import with_step_cache
    from consisid_pack.nodes.native.step_cache import ConsisIDStepCache

    for bad in (-0.1, 1.5, float("nan")):
        message = ConsisIDStepCache.VALIDATE_INPUTS(threshold=bad)
        assert isinstance(message, str) and message.startswith("threshold ") and "from 0.0 to 1.0" in message
    assert ConsisIDStepCache.VALIDATE_INPUTS(threshold=0.15) is True
    not_cogvideox = type("Patcher", (), {"model": type("Base", (), {"diffusion_model": torch.nn.Linear(1, 1)})()})()
    with pytest.raises(Exception, match="this MODEL is a Linear, not ComfyUI's CogVideoX"):
        with_step_cache(not_cogvideox, 0.1)


def test_a_comfyui_without_outer_sample_wrappers_computes_tokens_each_step_and_refuses_the_cache(setup, monkeypatch, caplog):
    """The fence: without OUTER_SAMPLE wrappers the face tokens are computed at every call (the same
    latents) and ConsisID Step Cache is refused in one line."""
    import comfy.patcher_extension
    from consisid_pack.consisid_core.errors import ConsisIDError
    from consisid_pack.nodes.native.nodes import native_model
    from consisid_pack.nodes.native.step_cache import ConsisIDStepCache

    plain = native_latents(setup, 3)
    monkeypatch.delattr(comfy.patcher_extension.WrappersMP, "OUTER_SAMPLE")
    with _fence_looks_again(), caplog.at_level(logging.WARNING):
        model = native_model(setup["folder"], torch.float32)
        with pytest.raises(ConsisIDError, match="ConsisID Step Cache needs ComfyUI internals") as refused:
            ConsisIDStepCache().patch(model, 0.2)
        monkeypatch.undo()
        assert (native_latents(setup, 3, model=model) - plain).abs().max().item() <= 1e-6
    assert "\n" not in str(refused.value)
    assert ("face tokens once per run (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE): the face tokens are "
            "computed at every step") in caplog.text


def test_a_cogvideox_whose_layers_differ_turns_the_step_cache_off_in_one_line(monkeypatch, caplog):
    """A core CogVideoX whose blocks are held under another name: the probe says so and the node refuses."""
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
    from consisid_pack.consisid_core.errors import ConsisIDError
    from consisid_pack.nodes.native.step_cache import ConsisIDStepCache

    built = CogVideoXTransformer3DModel.__init__

    def renamed(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.layers = self.blocks
        del self.blocks

    monkeypatch.setattr(CogVideoXTransformer3DModel, "__init__", renamed)
    with _fence_looks_again(), caplog.at_level(logging.WARNING):
        with pytest.raises(ConsisIDError, match="ConsisID Step Cache needs"):
            ConsisIDStepCache().patch(None, 0.2)
        monkeypatch.undo()
    assert "differs in what the pack uses for ConsisID Step Cache (" in caplog.text
    assert "ConsisID Step Cache is refused in one line" in caplog.text


def test_the_face_tokens_are_computed_once_per_run(setup, monkeypatch):
    """The Local Facial Extractor runs once in a sampling run (the reference runs it once), not at every step."""
    from consisid_pack.nodes.native.comfy_parts import face_patcher

    face = face_patcher(setup["model"]).model.module
    calls = []
    real = type(face).face_tokens
    monkeypatch.setattr(type(face), "face_tokens", lambda self, *a: calls.append(1) or real(self, *a))
    native_latents(setup, 5)
    native_latents(setup, 4)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Several GPUs: MultiGPU CFG Split's deep clones (what can be checked on one CPU)


@pytest.fixture(scope="module")
def unet_and_face(setup, tmp_path_factory):
    """Core Load Diffusion Model's MODEL of the exported transformer, with ConsisID Face Layers."""
    import comfy.sd
    from consisid_core.face_layers import face_layers
    from consisid_core.native import export, read_face_file
    from consisid_pack.nodes.native.comfy_parts import with_face_layers

    transformer, face = export(setup["folder"], tmp_path_factory.mktemp("exported"), "tiny")
    core = comfy.sd.load_diffusion_model(str(transformer), model_options={"dtype": torch.float32})
    weights, info = read_face_file(face)
    return with_face_layers(core, face_layers(weights, info["config"]), info["latent_channels"],
                             info["scaling_factor"], info["scheduler"])


def _deep_clone_keeps_consisid(model):
    """A MultiGPU deep clone (ComfyUI reloads the transformer for the other device) of `model`:
    its own transformer and its own copies of the face layers and model sampling, the identity's
    wrappers and extra_conds, and the same weights."""
    import comfy.patcher_extension
    from consisid_pack.nodes.native.comfy_parts import FACE_LAYERS, face_patcher

    clone = model.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert clone.model is not model.model
    face, copied = (face_patcher(m).model.module for m in (model, clone))
    assert copied is not face
    assert all(torch.equal(a, b) for a, b in zip(face.state_dict().values(), copied.state_dict().values()))
    (wrapper,) = clone.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS)
    sampling = clone.object_patches["model_sampling"]
    assert wrapper.args == (copied, sampling) and sampling is not model.object_patches["model_sampling"]
    assert torch.equal(sampling.sigmas, model.object_patches["model_sampling"].sigmas)
    assert clone.object_patches["extra_conds"].args[0] is clone.model
    assert set(clone.object_patches) == set(model.object_patches)
    return clone


@pytest.mark.parametrize("loader", ["native", "unet"])
def test_a_multigpu_deep_clone_keeps_the_face_layers_and_samples_the_same_latents(setup, unet_and_face, loader):
    model = setup["model"] if loader == "native" else unet_and_face
    clone = _deep_clone_keeps_consisid(model)
    diff = (native_latents(setup, 3, model=clone) - native_latents(setup, 3, model=model)).abs().max().item()
    print(f"{loader}: max |deep clone - MODEL| {diff:.1e}")
    assert diff <= SAME_MODEL  # the transformer reloaded: the CPU's kernels may sum in another order


def test_multigpu_cfg_split_keeps_its_clones_face_layers_their_own(setup):
    """What MultiGPU CFG Split does with a second device (`create_multigpu_deepclones`: a deep clone
    per extra device, then `match_multigpu_clones` re-cloning them from the primary): each clone
    keeps the copies made for its model; on this CPU (one device) the node gives the MODEL back
    and the latents are the same."""
    import comfy.patcher_extension
    from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    from consisid_pack.nodes.native.comfy_parts import FACE_LAYERS, face_patcher

    model = setup["model"].clone()
    clone = model.deepclone_multigpu(new_load_device=torch.device("cpu"))
    clone.is_multigpu_base_clone = True
    model.set_additional_models("multigpu", [clone])
    model.match_multigpu_clones()
    (matched,) = model.get_additional_models_with_key("multigpu")
    assert matched.model is clone.model
    own = face_patcher(clone).model.module
    assert face_patcher(matched).model.module is own is not face_patcher(model).model.module
    (wrapper,) = matched.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS)
    assert wrapper.args[0] is own and wrapper.args[1] is matched.object_patches["model_sampling"]

    (split,) = MultiGPUCFGSplitNode.execute(setup["model"], 2).result
    assert split is not setup["model"] and not split.get_additional_models_with_key("multigpu")
    assert torch.equal(native_latents(setup, 3, model=split), native_latents(setup, 3))



def test_a_comfyui_without_multigpu_deep_clones_leaves_the_model_on_one_device_and_says_so(setup, monkeypatch, caplog):
    import comfy.patcher_extension
    from consisid_pack.nodes.native.nodes import native_model

    monkeypatch.delattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU")
    with _fence_looks_again(), caplog.at_level(logging.WARNING):
        model = native_model(setup["folder"], torch.float32)
        monkeypatch.undo()
    assert model.cached_patcher_init is None and not model.callbacks.get("on_deepclone_multigpu")
    assert ("MultiGPU CFG Split on the native MODEL (comfy.patcher_extension.CallbacksMP.ON_DEEPCLONE_MULTIGPU): "
            "the native MODEL runs on one device") in caplog.text
    assert torch.equal(native_latents(setup, 2, model=model), native_latents(setup, 2))

# ---------------------------------------------------------------------------------------------
# One seed; long videos


def test_the_seed_node_gives_the_noise_the_dpm_sampler_and_the_first_frame_seed_of_one_seed(setup):
    """ConsisID Seed's NOISE and SAMPLER are ConsisID Noise's and ConsisID DPM Sampler's at its seed
    (the same latents), and its INT is the seed for Identity Conditioning's first_frame_seed."""
    from consisid_pack.nodes.native.nodes import ConsisIDDPMSampler, ConsisIDNoise
    from consisid_pack.nodes.native.seed import ConsisIDSeed

    noise, sampler, seed = ConsisIDSeed().get(SEED)
    assert seed == SEED
    latent = {"samples": torch.zeros(1, 16, 3, 8, 12)}
    assert torch.equal(noise.generate_noise(latent), ConsisIDNoise().get_noise(SEED)[0].generate_noise(latent))
    (three_seeds,) = ConsisIDDPMSampler().get_sampler(SEED)
    assert torch.equal(native_latents(setup, 3, sampler=sampler, noise=noise.generate_noise(latent)),
                       native_latents(setup, 3, sampler=three_seeds))
    for bad in (-1, 2**64, 1.5):
        assert "seed" in str(ConsisIDSeed.VALIDATE_INPUTS(seed=bad))
    assert ConsisIDSeed.VALIDATE_INPUTS(seed=0) is True


def test_append_segment_joins_without_the_shared_frame_and_matches_colour_as_extend(setup):
    from consisid_core.segments import ColourReference
    from consisid_pack.consisid_core.errors import ConsisIDError
    from consisid_pack.nodes.native.long_video import ConsisIDAppendSegment

    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(9, 8, 12, 3, generator=g), torch.rand(9, 8, 12, 3, generator=g) * 0.5
    (video,) = ConsisIDAppendSegment().append(first, second, False)
    assert torch.equal(video, torch.cat([first, second[1:]]))
    (matched,) = ConsisIDAppendSegment().append(video, second, True)
    assert torch.equal(matched[:17], video)
    assert torch.equal(matched[17:], ColourReference.of(video[:9]).match(second)[1:])
    assert (matched[17:].mean() - first.mean()).abs() < (second.mean() - first.mean()).abs() / 4
    append = ConsisIDAppendSegment().append
    for video_in, segment, message in (
        (first, second[:, :4], "the segment's frames are 12×4, the video's 12×8"),
        (first, second[:1], "a segment of 1 frame adds nothing"),
        (first[:0], second, r"the video \(float32 \[0, 8, 12, 3\]\) is not an IMAGE: .*; connect a VAE decode's frames"),
        (first, "frames", r"the segment \(str\) is not an IMAGE"),
    ):
        with pytest.raises(ConsisIDError, match=message):
            append(video_in, segment, False)


# ---------------------------------------------------------------------------------------------
# Speed on a CPU: PyTorch's SDPA where ComfyUI chose its sub-quadratic attention by default


def test_on_a_cpu_the_native_model_attends_with_sdpa_unless_sub_quadratic_was_asked_for(setup, monkeypatch, caplog):
    import comfy.cli_args
    import comfy.ldm.cogvideo.model
    import comfy.ldm.modules.attention
    import comfy.model_patcher
    import comfy.ops
    from consisid_pack.nodes.native.nodes import native_model

    assert comfy.ldm.cogvideo.model.optimized_attention is comfy.ldm.modules.attention.attention_sub_quad
    calls = []
    sdpa = comfy.ops.scaled_dot_product_attention
    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    default = native_latents(setup, 2)
    assert len(calls) == 2 * 2  # both blocks of the tiny transformer, both steps
    monkeypatch.setattr(comfy.cli_args.args, "use_quad_cross_attention", True)
    asked = native_latents(setup, 2, model=native_model(setup["folder"], torch.float32))
    assert len(calls) == 4
    diff = (default - asked).abs().max().item()
    print(f"SDPA against ComfyUI's sub-quadratic attention: max |Δ| {diff:.1e}")
    assert diff <= SAME_MODEL
    monkeypatch.undo()
    # a ComfyUI without the per-model attention override: the attention ComfyUI chose, said in one line
    monkeypatch.delattr(comfy.model_patcher.ModelPatcher, "set_model_optimized_attention")
    with _fence_looks_again(), caplog.at_level(logging.WARNING):
        fallback = native_model(setup["folder"], torch.float32)
        monkeypatch.undo()
        assert "optimized_attention_override" not in fallback.model_options["transformer_options"]
    assert "the native MODEL's attention on a CPU (comfy.model_patcher.ModelPatcher.set_model_optimized_attention)" in caplog.text
