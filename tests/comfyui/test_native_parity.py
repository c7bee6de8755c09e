"""The native path in ComfyUI v0.33's own sampling, in-process on the CPU (skipped unless COMFYUI_DIR
names a ComfyUI source folder with native CogVideoX): same weights, same noise, same first-frame
latent -> the same latents as our Sampler (diffusers' ConsisIDPipeline)."""

import pytest
import torch

from native_parity import (FRAMES, GUIDANCE, HEIGHT, SAME_MODEL, SEED, TOLERANCE, WIDTH, first_latent,  # noqa: F401
                           native_latents, reference_latents, setup)
from native_tools import NEEDS_NATIVE, write_lora

pytestmark = [pytest.mark.comfyui, NEEDS_NATIVE]


def test_the_noise_node_draws_the_reference_pipelines_noise(setup):
    from consisid_pack.nodes.native.comfy_parts import ReferenceNoise

    latents, _ = first_latent(setup)
    noise = ReferenceNoise(SEED).generate_noise({"samples": torch.zeros(1, 16, 3, HEIGHT // 8, WIDTH // 8)})
    assert torch.equal(noise, latents.permute(0, 2, 1, 3, 4))


@pytest.mark.parametrize("steps", [5, 10])
def test_ddim_simple_gives_our_samplers_ddim_latents(setup, steps):
    reference = reference_latents(setup, steps)
    native = native_latents(setup, steps)
    diff = (native - reference).abs().max().item()
    print(f"ddim, {steps} steps: max |native - ours| {diff:.2e} (latents up to {reference.abs().max():.2f})")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("steps", [5, 10])
def test_dpm_sampler_node_gives_our_samplers_dpm_latents(setup, steps):
    from consisid_pack.nodes.native.nodes import ConsisIDDPMSampler

    (sampler,) = ConsisIDDPMSampler().get_sampler(SEED)
    reference = reference_latents(setup, steps, scheduler="dpm")
    diff = (native_latents(setup, steps, sampler=sampler) - reference).abs().max().item()
    print(f"dpm, {steps} steps: max |native - ours| {diff:.2e}")
    assert diff <= TOLERANCE


def test_ksampler_sampling_call_gives_the_same_latents(setup):
    """KSampler's own call (comfy.sample.sample, ddim + simple), given the reference's noise."""
    import comfy.sample
    from consisid_pack.nodes.native.nodes import identity_conditioned

    _, first = first_latent(setup)
    text = setup["text"]
    positive, negative = identity_conditioned([[text.positive, {}]], [[text.negative, {}]], setup["identity"], first)
    latent = torch.zeros(1, 16, 3, HEIGHT // 8, WIDTH // 8)
    from consisid_core.reference import reference_noise

    noise = reference_noise(SEED, 16, 3, HEIGHT // 8, WIDTH // 8)
    out = comfy.sample.sample(setup["model"], noise, 5, GUIDANCE, "ddim", "simple", positive, negative, latent,
                              seed=SEED, disable_pbar=True)
    native = (out * 0.7).permute(0, 2, 1, 3, 4)
    assert (native - reference_latents(setup, 5)).abs().max().item() <= TOLERANCE


def test_dynamic_cfg_patch_gives_our_samplers_dynamic_cfg(setup):
    from consisid_pack.nodes.native.comfy_parts import with_dynamic_cfg

    reference = reference_latents(setup, 5, dynamic_cfg=True)
    native = native_latents(setup, 5, model=with_dynamic_cfg(setup["model"]))
    assert (native - reference).abs().max().item() <= TOLERANCE
    assert (native - reference_latents(setup, 5)).abs().max().item() > 1e-2  # it did change the guidance


def test_identity_strength_and_its_step_range_act(setup):
    full = native_latents(setup, 5)
    assert (native_latents(setup, 5, strength=2.0) - full).abs().max() > 1e-3
    no_identity = native_latents(setup, 5, strength=0.0)
    assert (no_identity - full).abs().max() > 1e-3
    assert (native_latents(setup, 5, strength=2.0, start=0.0, end=0.0) - no_identity).abs().max().item() <= TOLERANCE
    late = native_latents(setup, 5, start=0.5, end=1.0)
    assert (late - full).abs().max() > 1e-4 and (late - no_identity).abs().max() > 1e-4
    # the reference with identity strength 0 is the native path with strength 0
    assert (no_identity - reference_latents(setup, 5, identity_strength=0.0)).abs().max().item() <= TOLERANCE


def test_cores_own_cogvideox_model_sampling_is_not_the_reference_under_k_samplers(setup):
    """What the issue asked to find out: the same MODEL with core CogVideoX's V_PREDICTION_DDPM
    model sampling (unscaled x to the transformer) under KSampler's ddim is far from the reference."""
    import comfy.model_base

    model = setup["model"].clone()
    core_sampling = comfy.model_base.model_sampling(model.model.model_config, comfy.model_base.ModelType.V_PREDICTION_DDPM)
    model.add_object_patch("model_sampling", core_sampling)
    model.add_object_patch("diffusion_model.consisid_sampling", core_sampling)
    import comfy.model_sampling

    assert isinstance(core_sampling, comfy.model_sampling.V_PREDICTION_DDPM)
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(core_sampling, "simple", 5)
    reference = reference_latents(setup, 5)
    native = native_latents(setup, 5, model=model)
    diff = (native - reference).abs().max().item()
    print(f"core V_PREDICTION_DDPM under ddim: sigma_max {sigmas[0]:.1f}, max |diff| {diff:.2f}")
    assert diff > 0.5 or not torch.isfinite(native).all()


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    from consisid_core.native import export

    return export(setup["folder"], tmp_path_factory.mktemp("exported"), "tiny")


def test_exported_transformer_loads_in_core_as_cogvideox_and_with_the_face_file_is_the_same_model(setup, exported):
    """What core UNETLoader does with the exported file (comfy.sd.load_diffusion_model), then
    ConsisID Face Layers: the same latents as ConsisID Native Model Loader's MODEL."""
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    from consisid_core.face_layers import face_layers
    from consisid_core.native import read_face_file
    from consisid_pack.nodes.native.comfy_parts import with_face_layers

    transformer, face = exported
    core = comfy.sd.load_diffusion_model(str(transformer), model_options={"dtype": torch.float32})
    assert isinstance(core.model, comfy.model_base.CogVideoX)
    assert isinstance(core.model.model_config, comfy.supported_models.CogVideoX_I2V)  # in_channels 32
    weights, info = read_face_file(face)
    model = with_face_layers(core, face_layers(weights, info["config"]), info["latent_channels"],
                              info["scaling_factor"], info["scheduler"])
    # the same weights, loaded apart: the CPU's matmul kernels may sum in another order (max |Δ| ~1e-5)
    diff = (native_latents(setup, 5, model=model) - native_latents(setup, 5)).abs().max().item()
    print(f"exported + face file against the native loader: max |Δ| {diff:.1e}")
    assert diff <= SAME_MODEL


def test_face_layers_refuse_a_model_of_another_width(setup, exported):
    import comfy.sd
    from consisid_core.face_layers import FaceLayers, face_config
    from consisid_pack.nodes.native.comfy_parts import with_face_layers

    core = comfy.sd.load_diffusion_model(str(exported[0]), model_options={"dtype": torch.float32})
    wider = face_config({**setup["wrapper"].config, "num_attention_heads": 2})
    with torch.device("meta"):
        modules = FaceLayers(wider)
    with pytest.raises(ValueError, match="use the face file exported with this transformer"):
        with_face_layers(core, modules, 16, 0.7)


def _diffusers_lora(setup, path, names=("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_out.0",
                                        "transformer_blocks.1.ff.net.2"), scale=0.3):
    """A LoRA in diffusers/PEFT layout (`transformer.<layer>.lora_A.weight`, …) on the tiny transformer's `names`."""
    return write_lora(path, setup["wrapper"].transformer, names, seed=1, scale=scale)


def test_core_lora_loader_with_an_exported_lora_changes_latents_as_our_lora_does(setup, tmp_path):
    """Core LoraLoaderModelOnly's call (comfy.sd.load_lora_for_models) with a diffusers-layout ConsisID
    LoRA exported to ComfyUI's layout: the latents of our Sampler with the same LoRA (ConsisID LoRA)."""
    import comfy.sd
    import comfy.utils
    from consisid_core.lora import read_lora, with_loras
    from consisid_core.native import export_lora

    path = _diffusers_lora(setup, tmp_path / "style.safetensors")
    converted = export_lora(path, tmp_path / "style_comfy.safetensors")
    lora_model, _ = comfy.sd.load_lora_for_models(setup["model"], None, comfy.utils.load_torch_file(str(converted)), 0.8, 0)
    assert len(lora_model.patches) == 3
    ours = with_loras(setup["wrapper"], [(read_lora(path), 0.8)])
    from consisid_core.sampling import sample

    reference = sample(ours, setup["identity"], setup["text"], seed=SEED, steps=5, cfg=GUIDANCE,
                       scheduler="ddim", length=FRAMES, height=HEIGHT, width=WIDTH, device="cpu")
    native = native_latents(setup, 5, model=lora_model)
    assert (native - native_latents(setup, 5)).abs().max() > 1e-2  # the LoRA changed the video
    assert (native - reference).abs().max().item() <= TOLERANCE
    # and the loaded MODEL itself is left as it was
    assert torch.equal(native_latents(setup, 5), native_latents(setup, 5))


def test_native_lora_node_reads_the_diffusers_layout_as_core_reads_the_export(setup, tmp_path, caplog):
    """ConsisID Native LoRA on the diffusers-layout file makes the patches core LoraLoaderModelOnly makes
    of the exported file: the same latents, bit for bit; a face-layer layer is left out with a warning."""
    import logging

    import comfy.sd
    import comfy.utils
    import folder_paths
    from consisid_core.native import export_lora
    from consisid_pack.nodes.native.nodes import ConsisIDNativeLoRA

    names = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "perceiver_cross_attention.0.to_q")
    path = _diffusers_lora(setup, tmp_path / "loras" / "style.safetensors", names)
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"))
    with caplog.at_level(logging.WARNING):
        (node_model,) = ConsisIDNativeLoRA().apply(setup["model"], "style.safetensors", 0.8)
    assert "1 face-layer layers of LoRA 'style.safetensors' are left out" in caplog.text
    exported = comfy.utils.load_torch_file(str(export_lora(path, tmp_path / "style_comfy.safetensors")))
    core_model, _ = comfy.sd.load_lora_for_models(setup["model"], None, exported, 0.8, 0)
    assert set(node_model.patches) == set(core_model.patches) and len(node_model.patches) == 2
    assert torch.equal(native_latents(setup, 5, model=node_model), native_latents(setup, 5, model=core_model))


def test_native_lora_node_refuses_what_does_not_fit_in_one_line(setup, tmp_path):
    from consisid_pack.consisid_core.errors import ConsisIDError  # the pack's own copy, which its nodes raise
    from consisid_pack.consisid_core.lora import read_lora
    from consisid_pack.consisid_core.native import comfy_named
    from consisid_pack.nodes.native.comfy_parts import with_lora
    from safetensors.torch import save_file

    face_only = _diffusers_lora(setup, tmp_path / "face.safetensors", ("perceiver_cross_attention.0.to_q",))
    with pytest.raises(ConsisIDError, match="LoRA 'face.safetensors' changes only the face layers"):
        comfy_named(read_lora(face_only))
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 48),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)},
              tmp_path / "other.safetensors")
    with pytest.raises(ConsisIDError, match="is for a layer of 48 inputs and 64 outputs, this transformer's "
                                            "'blocks.0.q' has 64 and 64: it is for another model"):
        with_lora(setup["model"], comfy_named(read_lora(tmp_path / "other.safetensors")), 1.0)
    with pytest.raises(ValueError, match="this MODEL is a Linear, not ComfyUI's CogVideoX"):
        with_lora(type("Patcher", (), {"model": type("Base", (), {"diffusion_model": torch.nn.Linear(1, 1)})()})(),
                  comfy_named(read_lora(_diffusers_lora(setup, tmp_path / "ok.safetensors"))), 1.0)


@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "dpmpp_2m", "euler_ancestral"])
def test_core_samplers_the_wrapper_lacks_run(setup, sampler):
    out = native_latents(setup, 5, sampler=sampler)
    assert torch.isfinite(out).all() and out.abs().max() < 50


def test_native_vae_decode_gives_our_frames_and_core_vae_decode_its_own(setup, native_vae_file):
    """Core VAE Loader's VAE (comfy.sd.VAE over diffusers key names) on the native LATENT, and our
    VAE Decode (diffusers' AutoencoderKLCogVideoX) on the same latent in our Sampler's scale.

    ConsisID Native VAE Decode runs core's module in the reference's order (two latent frames at a
    time): our frames within 1e-4, which also checks the LATENT's layout and scale. Core VAE Decode
    runs it in its rolling order (temporal part whole, spatial part in chunks of frames): group norms
    see other frames, so its frames differ (printed; large on random weights). (Without the batched
    order in core's module the node decodes as core does: tests/comfyui/comfy_fence.py.) Every latent frame,
    a quarter of the area: the released-size VAE is slow on a CPU."""
    import comfy.sd
    import comfy.utils
    from consisid_core.single_file import load_vae_file
    from consisid_core.sampling import decode
    from consisid_pack.nodes.native.nodes import ConsisIDNativeVAEDecode

    path = native_vae_file
    native = native_latents(setup, 5)[..., : HEIGHT // 16, : WIDTH // 16]  # [1, F, C, h, w], our scale
    latent = {"samples": native.permute(0, 2, 1, 3, 4) / 0.7}  # the LATENT KSampler returns
    core_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    core_vae.first_stage_model.float()
    ours = decode(load_vae_file(path, "fp32"), native.contiguous(), "cpu")
    (frames,) = ConsisIDNativeVAEDecode().decode(latent, core_vae)
    assert frames.shape == ours.shape == (FRAMES, HEIGHT // 2, WIDTH // 2, 3)
    diff = (frames - ours).abs().max().item()
    rolling = core_vae.decode(latent["samples"])
    rolling = rolling.reshape(-1, *rolling.shape[-3:])
    print(f"VAE decode: max |ConsisID Native VAE Decode - ours| {diff:.2e}; core VAE Decode (rolling) "
          f"{(rolling - ours).abs().max().item():.2e}")
    assert diff <= TOLERANCE
    assert rolling.shape == ours.shape and torch.isfinite(rolling).all()


def test_a_partial_load_casts_the_face_layers_per_call_as_cores_and_keeps_the_latents(setup, monkeypatch):
    """ComfyUI's partial (low-VRAM) load of the native MODEL, forced on the CPU through
    load_models_gpu with a budget of one byte (as --novram): every face layer is castable as
    core's layers are and takes the cast-per-call path (a plain torch layer would stay in RAM
    beside a GPU's inputs), and the latents are the whole load's."""
    import comfy.model_management
    from consisid_pack.nodes.native.comfy_parts import face_patcher
    from consisid_pack.nodes.native.nodes import native_model

    whole = native_latents(setup, 3)
    model = native_model(setup["folder"], torch.float32)
    face = face_patcher(model).model
    real_load = comfy.model_management.LoadedModel.model_load

    def partial(loaded, lowvram_model_memory=0, force_patch_weights=False):
        budget = 1 if loaded.model in (model, face_patcher(model)) else lowvram_model_memory
        return real_load(loaded, budget, force_patch_weights=force_patch_weights)

    monkeypatch.setattr(comfy.model_management.LoadedModel, "model_load", partial)
    try:
        partial_latents = native_latents(setup, 3, model=model)
        layers = [m for m in face.modules() if next(m.children(), None) is None and next(m.parameters(), None) is not None]
        assert layers and all(getattr(m, "comfy_cast_weights", False) for m in layers), [
            type(m).__name__ for m in layers if not getattr(m, "comfy_cast_weights", False)]
        assert model.model.model_lowvram and face.model_lowvram
    finally:
        comfy.model_management.unload_all_models()
    assert (partial_latents - whole).abs().max().item() <= 1e-5


def test_fp8_weights_sample_with_the_face_layers_in_the_compute_dtype(setup):
    """Load Diffusion Model's fp8_e4m3fn (the low-VRAM choice): the transformer stored in fp8 and cast
    per call by core, the face layers kept in the dtype it computes in; the video is fp8's, close
    to fp32's."""
    from consisid_pack.nodes.native.comfy_parts import face_patcher
    from consisid_pack.nodes.native.nodes import native_model

    model = native_model(setup["folder"], torch.float8_e4m3fn)
    assert model.model.get_dtype() == torch.float8_e4m3fn
    face = face_patcher(model).model
    assert {p.dtype for p in face.parameters()} == {model.model.get_dtype_inference()}
    fp8, fp32 = native_latents(setup, 3, model=model), native_latents(setup, 3)
    assert torch.isfinite(fp8).all() and 0 < (fp8 - fp32).abs().max() < 0.5


def test_a_first_frame_seed_gives_the_reference_pipelines_posterior_sample(native_vae_file):
    """Identity Conditioning's first frame through core VAE Loader's VAE: with a seed, the posterior
    sampled as ConsisIDPipeline's prepare_latents samples it (diffusers' VAE on the same file, a CPU
    generator with that seed); without, core VAE Encode's mean. (Without core's encoder output the
    seed is refused in one line and the mean is used: tests/comfyui/comfy_fence.py.)"""
    import comfy.sd
    import comfy.utils
    from consisid_core.single_file import load_vae_file
    from consisid_pack.nodes.native.comfy_parts import encode_first_frame

    core_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(native_vae_file)))
    core_vae.first_stage_model.float()
    core_vae.vae_dtype = torch.float32
    pixels = torch.rand(1, HEIGHT // 2, WIDTH // 2, 3, generator=torch.Generator().manual_seed(4))  # a quarter: slow VAE
    diffusers_vae = load_vae_file(native_vae_file, "fp32")
    with torch.no_grad():
        posterior = diffusers_vae.encode((pixels * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)).latent_dist
    sampled, mean = encode_first_frame(core_vae, pixels, 11), encode_first_frame(core_vae, pixels, None)
    reference = posterior.sample(torch.Generator("cpu").manual_seed(11))
    print(f"first frame: max |seeded - reference| {(sampled - reference).abs().max().item():.2e}, "
          f"max |mean - reference mean| {(mean - posterior.mean).abs().max().item():.2e}")
    assert sampled.shape == reference.shape == (1, 16, 1, HEIGHT // 16, WIDTH // 16)
    assert (sampled - reference).abs().max().item() <= TOLERANCE
    assert (mean - posterior.mean).abs().max().item() <= TOLERANCE
    assert (sampled - mean).abs().max().item() > 1e-3  # the seed does act


def test_an_identity_of_another_checkpoint_is_refused_by_name(setup):
    from consisid_core.tiny import TINY_TRANSFORMER, random_identity

    other = random_identity({**TINY_TRANSFORMER, "LFE_id_dim": 100}, seed=1)
    with pytest.raises(ValueError, match="the identity does not fit this model: id_cond of width 100"):
        native_latents({**setup, "identity": other}, 5)
