"""Everything of ComfyUI that the native path uses, in one place, and what it assumes of it (`ASSUMPTIONS`).

ConsisID is CogVideoX-5B-I2V plus face modules, so its native MODEL is core's own CogVideoX
MODEL (`comfy.sd.load_diffusion_model_state_dict`: model detection, `model_base.CogVideoX`,
`comfy.ldm.cogvideo` on `comfy.ops`) with what ConsisID changes added through ComfyUI's own
ModelPatcher mechanisms, so that the same addition works on a MODEL from core UNETLoader, from
ComfyUI-GGUF's UnetLoaderGGUF, and after LoRA loaders:

- object patches: the face modules as `diffusion_model.consisid_face` (loaded and offloaded with
  the transformer), the reference's rotary embedding (core's CogVideoX 1.0 rotary scales the grid
  by spatial_interpolation_scale; ConsisIDPipeline crops it to the native aspect), the model
  sampling below, the checkpoint's latent format, and `extra_conds` passing the identity on;
- a DIFFUSION_MODEL wrapper: the Local Facial Extractor once per call, and after every
  `cross_attn_interval` blocks the perceiver cross-attention times the identity strength (forward
  hooks held for that call only), within the conditioning's start/end percent.

Model sampling: core's CogVideoX uses `V_PREDICTION_DDPM`, whose `calculate_input` gives the
transformer k-diffusion's unscaled x (x_t·√(1+σ²)) and whose `calculate_denoised` reads it as
x_t: right for a DDPM loop (core's VOID nodes), wrong for k-samplers (tests/test_native_parity.py
measures it). `ModelSamplingConsisID` is the same schedule (v-prediction, scaled-linear betas
0.00085–0.012, zero terminal SNR, from diffusers' scheduler) in flow coordinates: finite at the
zero-SNR end, Euler there is DDIM step for step, and `simple` picks the trailing timesteps.
"""

from __future__ import annotations

import functools
import logging

import torch

from ...consisid_core import quant
from ...consisid_core.errors import ConsisIDError
from ...consisid_core.lora import LoRA, check_lora_fits
from ...consisid_core.native import (
    FaceModules,
    comfy_lora_tensors,
    ReferenceStepNoise,
    dynamic_guidance,
    flow_input_scale,
    flow_sigmas,
    posterior_sample,
    reference_noise,
    rotary_embedding,
)
from .. import fence, host

try:
    import comfy.conds
    import comfy.k_diffusion.sampling
    import comfy.latent_formats
    import comfy.model_management
    import comfy.model_sampling
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.ldm.cogvideo.vae
    import comfy.sd
    import node_helpers
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
    from comfy.ldm.cogvideo.vae import AutoencoderKLCogVideoX
except ImportError:  # outside ComfyUI, or a ComfyUI without native CogVideoX (before v0.21)
    CogVideoXTransformer3DModel = None

logger = logging.getLogger(__name__)

AVAILABLE = CogVideoXTransformer3DModel is not None
UNAVAILABLE = (
    "the native ConsisID nodes need ComfyUI's own CogVideoX (comfy.ldm.cogvideo, ComfyUI v0.21 or later); "
    "update ComfyUI, or use the ConsisID wrapper nodes (ConsisID Model Loader, ConsisID Sampler)"
)
COMFY_INTERNALS = (
    "comfy.sd.load_diffusion_model_state_dict",
    "comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel (._get_rotary_emb, .blocks, ._forward's kwargs)",
    "comfy.model_base.CogVideoX (.extra_conds, .concat_cond with concat_latent_image, .latent_format, "
    ".get_dtype_inference, else .get_dtype)",
    "comfy.model_sampling.ModelSamplingDiscrete (.set_sigmas, .timestep, .percent_to_sigma), comfy.model_sampling.CONST, "
    "comfy.model_sampling.reshape_sigma",
    "comfy.latent_formats.CogVideoX",
    "comfy.conds.CONDRegular, comfy.conds.CONDConstant",
    "comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL (the executor's .class_obj)",
    "comfy.model_patcher.ModelPatcher (.clone, .add_object_patch, .add_wrapper_with_key, "
    ".set_model_sampler_cfg_function, .model_size, .size, .get_model_object)",
    "comfy.model_management.module_size, comfy.model_management.intermediate_device",
    "comfy.sd.VAE (.encode of [N, H, W, 3], .decode, .latent_channels, .first_stage_model, .patcher, .device, "
    ".vae_dtype, .output_device, .memory_used_decode, .process_output)",
    "comfy.sd.load_lora_for_models (what LoraLoaderModelOnly calls)",
    "comfy.model_management.load_models_gpu, .throw_exception_if_processing_interrupted, .soft_empty_cache",
    "comfy.samplers.KSAMPLER, comfy.k_diffusion.sampling.sample_dpmpp_2m_sde (noise_sampler, solver_type)",
    "node_helpers.conditioning_set_values",
    "samplers: model_options['transformer_options']['sample_sigmas'], transformer_options['sigmas'], "
    "sampler_cfg_function's args (cond, uncond, cond_scale, sigma, model, model_options)",
    "ModelPatcher object patches may add attributes the model lacks (comfy.utils.set_attr with ATTR_UNSET)",
)
"""The internals not yet probed by an `ASSUMPTIONS` entry (each moves into one)."""


def _native_cogvideox() -> list[str]:
    return [] if AVAILABLE else ["comfy.ldm.cogvideo"]


def _reference_decode() -> list[str]:
    return [] if callable(getattr(AutoencoderKLCogVideoX, "_decode_batched", None)) else [
        "comfy.ldm.cogvideo.vae.AutoencoderKLCogVideoX._decode_batched"]


def _first_frame_sample() -> list[str]:
    encoder = getattr(comfy.ldm.cogvideo.vae, "Encoder3D", None)
    return [] if fence.takes(getattr(encoder, "forward", None), "x", "conv_cache") else [
        "comfy.ldm.cogvideo.vae.Encoder3D.forward(x, conv_cache=)"]


ASSUMPTIONS = (
    fence.Assumption("native_cogvideox", "the native ConsisID nodes", UNAVAILABLE, _native_cogvideox, quiet=True),
    fence.Assumption("native_reference_decode", "ConsisID Native VAE Decode's reference order",
                     "it decodes as core VAE Decode does, and the frames differ a little from the reference's",
                     _reference_decode, needs="native_cogvideox"),
    fence.Assumption("native_first_frame_sample", "Identity Conditioning's first_frame_seed",
                     "the first frame's latent is the posterior mean (as core VAE Encode), whatever the seed",
                     _first_frame_sample, needs="native_cogvideox"),
)
"""What the native path assumes of ComfyUI, checked with the wrapper's by `fence.check`."""


def require(feature: str = "native_cogvideox", option: str = "this native ConsisID node") -> None:
    """Refuse `option` in one line on a ComfyUI without native CogVideoX, or where `feature` differs."""
    if not AVAILABLE:
        raise fence.ComfyApiError(UNAVAILABLE)
    fence.require(feature, option)


# ---------------------------------------------------------------------------------------------
# Model sampling


class VPredictionFlow(comfy.model_sampling.CONST if AVAILABLE else object):
    """v-prediction of a DDPM model, sampled in flow coordinates x = (1-σ)·x0 + σ·ε (so CONST's
    noise scaling, and the RF branches of ComfyUI's ancestral samplers, are right as they are)."""

    def calculate_input(self, sigma, noise):
        sigma = comfy.model_sampling.reshape_sigma(sigma, noise.ndim)
        return noise * flow_input_scale(sigma)

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = comfy.model_sampling.reshape_sigma(sigma, model_output.ndim)
        scale = flow_input_scale(sigma)
        # x_t = x·(√ᾱ + √(1-ᾱ)); √ᾱ = (1-σ)·scale, √(1-ᾱ) = σ·scale; x0 = √ᾱ·x_t - √(1-ᾱ)·v
        return (1 - sigma) * scale * scale * model_input - sigma * scale * model_output


class ModelSamplingConsisID(*((comfy.model_sampling.ModelSamplingDiscrete,) if AVAILABLE else ()), VPredictionFlow):
    """ConsisID's schedule (the checkpoint's scheduler config, as diffusers computes ᾱ) as ComfyUI
    model sampling: 1000 discrete timesteps, σ_999 = 1."""

    def __init__(self, scheduler_config=None):
        torch.nn.Module.__init__(self)
        sigmas = flow_sigmas(scheduler_config)
        self.num_timesteps = len(sigmas)
        self.zsnr = True
        self.set_sigmas(sigmas)
        self.sigma_data = 1.0


class ConsisIDLatent(comfy.latent_formats.CogVideoX if AVAILABLE else object):
    """The checkpoint's own latent channels and scaling factor (0.7 and 16 for the released one)."""

    def __init__(self, channels: int, scale_factor: float):
        super().__init__()
        self.latent_channels = channels
        self.scale_factor = scale_factor
        if channels != 16:
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None


# ---------------------------------------------------------------------------------------------
# The face modules on a CogVideoX MODEL

IDENTITY_KEYS = ("consisid_id_cond", "consisid_id_vit_hidden")
OPTION_KEYS = ("consisid_strength", "consisid_start", "consisid_end")


def _extra_conds(model_base, **kwargs):
    """Core CogVideoX's extra_conds plus the identity (the same for every CFG pass it is set on)."""
    out = type(model_base).extra_conds(model_base, **kwargs)
    if kwargs.get("consisid_id_cond") is not None:
        for key in IDENTITY_KEYS:
            out[key] = comfy.conds.CONDRegular(kwargs[key])
        for key in OPTION_KEYS:
            out[key] = comfy.conds.CONDConstant(float(kwargs[key]))
    return out


def _face_wrapper(executor, x, timestep, context, ofs=None, transformer_options=None, **kwargs):
    """Around the transformer's `_forward`: the identity's cross-attention after its blocks."""
    id_cond, hidden = (kwargs.pop(key, None) for key in IDENTITY_KEYS)
    strength, start, end = (kwargs.pop(key, None) for key in OPTION_KEYS)
    model = executor.class_obj
    face: FaceModules = model.consisid_face
    if id_cond is None or not strength or not _active(model, transformer_options, start, end):
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    config = face.config
    found = (id_cond.shape[-1], hidden.shape[1], hidden.shape[-1])
    if found != (config["LFE_id_dim"], config["LFE_num_scale"], config["LFE_vit_dim"]):
        raise ValueError(
            f"the identity does not fit this model: id_cond of width {found[0]} and {found[1]} hidden states of "
            f"width {found[2]}, the face modules take {config['LFE_id_dim']}, {config['LFE_num_scale']} and "
            f"{config['LFE_vit_dim']}: make the identity with this checkpoint's face models"
        )
    if all(torch.equal(t, t[:1].expand_as(t)) for t in (id_cond, hidden)):
        # one identity on every CFG pass (as the reference): its tokens once, broadcast in the cross-attention
        id_cond, hidden = id_cond[:1], hidden[:1]
    tokens = face.face_tokens(id_cond, list(hidden.unbind(1)))

    def add(which, _block, _args, output):
        hidden_states, encoder_hidden_states = output
        return hidden_states + strength * face.cross_attention(which, tokens, hidden_states), encoder_hidden_states

    hooks = [
        block.register_forward_hook(functools.partial(add, face.after_block(i)))
        for i, block in enumerate(model.blocks)
        if face.after_block(i) is not None
    ]
    try:
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def _active(model, transformer_options, start: float, end: float) -> bool:
    """Whether this step lies within [start, end] percent of the sampling (ComfyUI's convention:
    percent of the model's sigma range, as ControlNet's start/end)."""
    if start <= 0 and end >= 1:
        return True
    sigmas = (transformer_options or {}).get("sigmas")
    if sigmas is None:
        return True
    sampling = model.consisid_sampling
    sigma = float(sigmas.max())
    return sampling.percent_to_sigma(end) <= sigma <= sampling.percent_to_sigma(start)


def _cogvideox(model):
    """The CogVideoX transformer of a MODEL (`ModelPatcher`), refused in one line if it has none."""
    core = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(core, CogVideoXTransformer3DModel):
        found = type(core if core is not None else model).__name__
        raise ValueError(f"this MODEL is a {found}, not ComfyUI's CogVideoX: connect ConsisID Native Model Loader's "
                         "MODEL, or the exported ConsisID transformer from Load Diffusion Model")
    return core


def with_face_modules(model, face: FaceModules, latent_channels: int, scaling_factor: float, scheduler_config=None):
    """A clone of a CogVideoX MODEL (`ModelPatcher`) that is ConsisID: face modules, rotary
    embedding, model sampling, latent format and identity conditioning added as patches."""
    require()
    core = _cogvideox(model)
    base = model.model
    config = face.config
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if core.dim != width or len(core.blocks) != config["num_layers"] or core.attention_head_dim != config["attention_head_dim"]:
        raise ValueError(
            f"these face modules are for a transformer {width} wide with {config['num_layers']} blocks of "
            f"{config['attention_head_dim']}-wide heads; this MODEL is {core.dim} wide with {len(core.blocks)} blocks of "
            f"{core.attention_head_dim}-wide heads: use the face file exported with this transformer"
        )
    sampling = ModelSamplingConsisID(scheduler_config)
    patched = model.clone()
    # in the dtype the transformer computes in (not fp8 storage: the extractor's own parameters are used as
    # they are), castable as core's layers, so a partial load casts the face layers left in RAM per call
    face = face.to(dtype=getattr(base, "get_dtype_inference", base.get_dtype)())
    host.castable_in(patched, face)
    patched.add_object_patch("diffusion_model.consisid_face", face)
    patched.add_object_patch("diffusion_model.consisid_sampling", sampling)
    patched.add_object_patch("diffusion_model._get_rotary_emb", functools.partial(_rotary, config))
    patched.add_object_patch("model_sampling", sampling)
    patched.add_object_patch("latent_format", ConsisIDLatent(latent_channels, scaling_factor))
    patched.add_object_patch("extra_conds", functools.partial(_extra_conds, base))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "consisid_face", _face_wrapper)
    patched.size = model.model_size() + comfy.model_management.module_size(face)
    return patched


def _rotary(config, height, width, frames, device=None):
    return rotary_embedding(config, height, width, frames, device)


def load_cogvideox(state_dict: dict, dtype: torch.dtype | None):
    """Core's own CogVideoX MODEL from weights in its key layout (what UNETLoader does)."""
    require()
    options = {} if dtype is None else {"dtype": dtype}
    model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options)
    if model is None:
        raise ValueError("ComfyUI did not recognise these weights as CogVideoX")
    return model


def identity_conditioning(conditioning, image_latent, id_cond, id_vit_hidden, strength, start, end):
    """`conditioning` with the first frame's latent and the identity on every entry."""
    return node_helpers.conditioning_set_values(conditioning, {
        "concat_latent_image": image_latent,
        "consisid_id_cond": id_cond,
        "consisid_id_vit_hidden": id_vit_hidden,
        "consisid_strength": strength,
        "consisid_start": start,
        "consisid_end": end,
    })


def encode_first_frame(vae, pixels: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The first frame's latent [1, C, 1, h, w] from an IMAGE [1, H, W, 3]: core VAE Encode's
    posterior mean, or with `seed` the posterior sampled as ConsisIDPipeline samples it for that
    seed (so ConsisID Noise with the same seed gives the reference's video)."""
    module = vae.first_stage_model
    if seed is None or not isinstance(module, AutoencoderKLCogVideoX) or not fence.works("native_first_frame_sample"):
        return vae.encode(pixels)
    encoder = module.encoder
    x = vae.process_input(pixels).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, 1, H, W], as core's encode
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(x.shape, vae.vae_dtype))
    with torch.inference_mode():
        moments, _ = encoder(x.to(device=vae.device, dtype=vae.vae_dtype), conv_cache=None)
    return posterior_sample(moments.to(vae.output_device), seed).to(intermediate_device(), torch.float32)


def latent_channels(vae) -> int:
    return vae.latent_channels


def intermediate_device():
    return comfy.model_management.intermediate_device()


class ReferenceNoise:
    """A NOISE for SamplerCustomAdvanced: the noise ConsisIDPipeline draws for a seed."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        _, channels, frames, height, width = samples.shape
        return reference_noise(self.seed, channels, frames, height, width)


def _reference_dpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_seed=0):
    extra_args = {} if extra_args is None else extra_args
    step_noise = ReferenceStepNoise(noise_seed, tuple(x.shape), x.dtype)
    if len(sigmas) > 2 and sigmas[0] >= 1:
        # at zero SNR the (2M) SDE step is: x0 predicted, noised afresh to the next sigma. Core's
        # sampler would move sigma_max off 1 first (its log-SNR is -inf), which is not the reference.
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
        if callback is not None:
            callback({"x": x, "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": denoised})
        x = (1 - sigmas[1]) * denoised + sigmas[1] * step_noise().to(x.device)
        sigmas = sigmas[1:]
        if callback is not None:
            callback = functools.partial(_shifted, callback)
    return comfy.k_diffusion.sampling.sample_dpmpp_2m_sde(
        model, x, sigmas, extra_args, callback, disable, eta=1.0, s_noise=1.0,
        noise_sampler=lambda _sigma, _sigma_next: step_noise().to(x.device), solver_type="midpoint",
    )


def _shifted(callback, step: dict):
    return callback({**step, "i": step["i"] + 1})


def reference_dpm_sampler(noise_seed: int):
    """The reference's `dpm` as a SAMPLER: core's DPM-Solver++(2M) SDE (midpoint, eta 1), which is
    CogVideoXDPMScheduler's update, given the noise that scheduler draws for the seed at each step."""
    return comfy.samplers.KSAMPLER(_reference_dpm, extra_options={"noise_seed": noise_seed})


def with_dynamic_cfg(model):
    """A clone of `model` whose CFG scale follows the reference's cosine schedule each step."""
    patched = model.clone()

    def dynamic(args):
        sampling = args["model"].model_sampling
        timestep = float(sampling.timestep(args["sigma"]).flatten()[0])
        steps = len(args["model_options"]["transformer_options"]["sample_sigmas"]) - 1
        scale = dynamic_guidance(args["cond_scale"], timestep, steps)
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale

    patched.set_model_sampler_cfg_function(dynamic, disable_cfg1_optimization=True)
    return patched


# ---------------------------------------------------------------------------------------------
# LoRA and VAE decode


def with_lora(model, lora: LoRA, strength: float):
    """`model` with a `native.comfy_named` LoRA, through core LoraLoaderModelOnly's own call
    (`comfy.sd.load_lora_for_models`): the same weight patches as core's loader would make of the
    exported file, stacking with theirs in any order."""
    check_lora_fits(lora, _cogvideox(model))
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy_lora_tensors(lora), strength, 0)
    return patched


def decode_in_reference_order(vae, samples: torch.Tensor) -> torch.Tensor:
    """A CogVideoX LATENT ([B, C, T, h, w], as samplers return it) decoded by core's VAE module in
    the order diffusers (and CogVideoX's own code) decodes: two latent frames at a time, the odd
    one with the first. Core's `decode` runs the temporal layers on the whole video and the rest in
    chunks of four frames, so its group norms see other frames and the pixels differ. Returns an
    IMAGE [B·F, H, W, 3]; one video at a time, Cancel checked between them."""
    module = getattr(vae, "first_stage_model", None)
    if not isinstance(module, AutoencoderKLCogVideoX):
        raise ConsisIDError(f"this VAE is a {type(module).__name__}, not CogVideoX's: load the ConsisID checkpoint's "
                            "vae/diffusion_pytorch_model.safetensors with Load VAE")
    if samples.ndim != 5 or samples.shape[1] != vae.latent_channels:
        raise ConsisIDError(f"this LATENT {list(samples.shape)} is not a video latent of {vae.latent_channels} "
                            "channels: connect the sampler's LATENT")
    if not fence.works("native_reference_decode"):
        images = vae.decode(samples)
    else:
        try:
            images = _decode_videos(vae, module._decode_batched, samples)
        except torch.OutOfMemoryError:
            comfy.model_management.soft_empty_cache()
            raise ConsisIDError(f"out of memory decoding {samples.shape[2]} latent frames of {samples.shape[3] * 8}x"
                                f"{samples.shape[4] * 8} whole: use core VAE Decode (Tiled), which decodes in tiles "
                                "(in core's order)") from None
    return images.reshape(-1, *images.shape[-3:])


def _decode_videos(vae, batched, samples: torch.Tensor) -> torch.Tensor:
    memory = vae.memory_used_decode(samples[:1].shape, vae.vae_dtype)
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory)
    videos = []
    with torch.inference_mode():
        for video in samples.split(1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pixels = batched(video.to(device=vae.device, dtype=vae.vae_dtype))
            videos.append(vae.process_output(pixels.to(device=vae.output_device, dtype=torch.float32)).movedim(1, -1))
    return torch.cat(videos)



# ---------------------------------------------------------------------------------------------
# Core's quantized formats: what ConsisID Native Model Loader's quantize-on-load (and a file of
# `export --quant`) relies on. The math is `consisid_core.quant`; core's Load Diffusion Model reads
# the result (`comfy.utils.detect_layer_quantization`, `comfy.ops.mixed_precision_ops`).


def _read_back(ops, name: str) -> float:
    """A random 32 × 256 weight in format `name`, loaded by core's mixed-precision Linear and
    dequantized: its relative error."""
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    stored = quant.quantize({"blocks.1.q.weight": weight}, name)
    holder = torch.nn.Module()
    holder.q = ops.mixed_precision_ops({"mixed_ops": True}, torch.float32).Linear(256, 32, bias=False)
    holder.load_state_dict({k.removeprefix("blocks.1."): v for k, v in stored.items()})
    back = holder.q.weight.dequantize().float()
    return ((back - weight).norm() / weight.norm()).item()


def _quant_problem(ops, algos: dict, name: str) -> str | None:
    if name not in algos:
        return f"comfy.quant_ops.QUANT_ALGOS has no '{name}'"
    try:
        error = _read_back(ops, name)
    except Exception as e:  # noqa: BLE001 -- whatever core's reader raises is what the probe reports
        return f"core's {name} reader fails ({type(e).__name__}: {str(e)[:60]})"
    limit = quant.FORMATS[name].relative_error
    return None if error <= limit else f"core reads {name} back {error:.2f} off (expected within {limit})"


def quant_problems() -> dict[str, str]:
    """The formats of `quant.FORMATS` this ComfyUI does not read as the pack writes them, with why:
    each is written for a tiny layer, loaded by core's mixed-precision Linear and read back (a few
    milliseconds in all)."""
    try:
        import comfy.ops
        import comfy.quant_ops
    except ImportError:  # a ComfyUI from before its quantized formats
        return {name: "no comfy.quant_ops" for name in quant.FORMATS}
    if not callable(getattr(comfy.ops, "mixed_precision_ops", None)):
        return {name: "no comfy.ops.mixed_precision_ops" for name in quant.FORMATS}
    algos = getattr(comfy.quant_ops, "QUANT_ALGOS", {})
    found = {name: _quant_problem(comfy.ops, algos, name) for name in quant.FORMATS}
    return {name: problem for name, problem in found.items() if problem}


ASSUMPTIONS += (
    fence.Assumption("native_quant", "core's quantized formats (quantize-on-load, export --quant files)",
                     "those formats are refused in one line; the others and full precision load as before",
                     lambda: list(quant_problems().values()), needs="native_cogvideox"),
)


def require_format(name: str) -> None:
    """Refuse, in one line, a quantized format this ComfyUI does not read as the pack writes it."""
    require()
    quant.check_format(name)
    problems = quant_problems()
    if name in problems:
        readable = [n for n in quant.FORMATS if n not in problems]
        raise fence.ComfyApiError(
            f"this ComfyUI ({fence.comfyui_version()}) does not read the quantized format '{name}' as the pack "
            f"writes it ({problems[name]}): pick {', '.join(readable) or 'off'}, or update ComfyUI and comfy-kitchen")
