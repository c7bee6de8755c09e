"""Everything of ComfyUI that the native path uses, in one place, and what it assumes of it (`ASSUMPTIONS`).

The native MODEL is core's own CogVideoX with ConsisID's face layers added through ComfyUI's
ModelPatcher mechanisms (an additional model, object patches, wrappers), so the same addition works
on any CogVideoX MODEL and after LoRA loaders; its model sampling is the checkpoint's schedule in
flow coordinates. Each internal is probed when the pack loads, as the wrapper's are
(`nodes/fence.py`). How and why: docs/dev/native.md."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import threading
import types

import torch

from ...consisid_core import quant
from ...consisid_core.checks import LATENT_CAUSE, check_latent, check_tensors
from ...consisid_core.errors import ConsisIDError, IdentityError
from ...consisid_core.lora import LoRA, check_lora_fits
from ...consisid_core.face_layers import FaceLayers
from ...consisid_core.native import comfy_lora_tensors, model_parts
from ...consisid_core.reference import (
    ReferenceStepNoise,
    dynamic_guidance,
    flow_input_scale,
    flow_sigmas,
    posterior_sample,
    reference_noise,
    rotary_embedding,
)
from ...consisid_core.performance import StepCacheStats, TeaCacheState
from .. import fence, managed, progress

try:
    import comfy.cli_args
    import comfy.conds
    import comfy.k_diffusion.sampling
    import comfy.latent_formats
    import comfy.lora
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.ops
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.ldm.modules.attention
    import comfy.sd
    import comfy.utils
    import node_helpers
    import comfy.ldm.cogvideo.model as cogvideo
except ImportError:  # outside ComfyUI, or a ComfyUI without native CogVideoX (before v0.21)
    cogvideo = None
try:
    import comfy.ldm.cogvideo.vae as cogvideo_vae
except ImportError:
    cogvideo_vae = None

logger = logging.getLogger(__name__)

CogVideoXTransformer3DModel = getattr(cogvideo, "CogVideoXTransformer3DModel", None)
AVAILABLE = CogVideoXTransformer3DModel is not None
UNAVAILABLE = (
    "the native ConsisID nodes need ComfyUI's own CogVideoX (comfy.ldm.cogvideo, ComfyUI v0.21 or later); "
    "update ComfyUI, or use the ConsisID wrapper nodes (ConsisID Model Loader, ConsisID Sampler)"
)


# ---------------------------------------------------------------------------------------------
# The probes: each returns what differs of what the native path uses (empty when all is as expected)


def _native_cogvideox() -> list[str]:
    return [] if AVAILABLE else ["comfy.ldm.cogvideo"]


def _source(function) -> str:
    """A function's source ('' where there is none to read), to see what ComfyUI's own code calls."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _params(function) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _takes_keywords(function) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False


def _missing(owner, names: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{n}" for n in names if not callable(getattr(owner, n, None))]


def _load() -> list[str]:
    load = getattr(comfy.sd, "load_diffusion_model_state_dict", None)
    return [] if fence.takes(load, "sd", "model_options") else ["comfy.sd.load_diffusion_model_state_dict(sd, model_options=)"]


def _block_outputs() -> list[str]:
    """A tiny CogVideoX block, run once: its output must be (hidden states, text states), each shaped as given."""
    where = "comfy.ldm.cogvideo.model.CogVideoXBlock(...) -> (hidden_states, encoder_hidden_states)"
    try:
        # torch's own layers (comfy.ops' leave their weights unset when dynamic VRAM is on), built on the meta
        # device and filled from a generator of its own (torch's init would draw from the global one)
        block = cogvideo.CogVideoXBlock(8, 2, 4, 8, device="meta", operations=torch.nn).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(0)
        for parameter in block.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
        hidden, text, temb = (torch.randn(shape, generator=generator) for shape in ((1, 3, 8), (1, 2, 8), (1, 8)))
        with torch.no_grad():
            out = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=None,
                        transformer_options={})
    except Exception as e:  # any way a changed block can fail is a mismatch, said in the log
        return [f"{where} ({type(e).__name__}: {str(e)[:80]})"]
    shaped = isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
    return [] if shaped and out[0].shape == hidden.shape and out[1].shape == text.shape else [where]


def _transformer() -> list[str]:
    model = CogVideoXTransformer3DModel
    found = []
    if _params(getattr(model, "_get_rotary_emb", None)) != ["self", "h", "w", "t", "device"]:
        found.append("CogVideoXTransformer3DModel._get_rotary_emb(self, h, w, t, device)")
    forward = _source(getattr(model, "_forward", None))
    if "self._get_rotary_emb(" not in forward or "self.blocks" not in forward:
        found.append("CogVideoXTransformer3DModel._forward calling self._get_rotary_emb and self.blocks")
    if not all(_takes_keywords(getattr(model, n, None)) for n in ("forward", "_forward")):
        found.append("CogVideoXTransformer3DModel.forward/_forward(..., **kwargs)")
    base = getattr(comfy.model_base, "CogVideoX", None)
    if not callable(getattr(base, "extra_conds", None)) or "concat_latent_image" not in _source(getattr(base, "concat_cond", None)):
        found.append("comfy.model_base.CogVideoX.extra_conds, .concat_cond(concat_latent_image=)")
    if "**extra_conds" not in _source(getattr(comfy.model_base.BaseModel, "_apply_model", None)):
        found.append("comfy.model_base.BaseModel._apply_model passing extra_conds to the diffusion model")
    if not callable(getattr(comfy.model_base.BaseModel, "get_dtype", None)):
        found.append("comfy.model_base.BaseModel.get_dtype")
    return found + _block_outputs()


def _model_sampling() -> list[str]:
    where = "comfy.model_sampling.ModelSamplingDiscrete/CONST/reshape_sigma, comfy.latent_formats.CogVideoX"
    if not all(hasattr(comfy.model_sampling, n) for n in ("ModelSamplingDiscrete", "CONST", "reshape_sigma")) or \
            not hasattr(comfy.latent_formats, "CogVideoX"):
        return [where]
    try:
        sampling = ModelSamplingConsisID()
        sigma = sampling.percent_to_sigma(0.5) * torch.ones(1)
        x = torch.ones(1, 2, 1, 2, 2)
        steps = sampling.timestep(sigma), sampling.calculate_input(sigma, x), sampling.calculate_denoised(sigma, x, x)
        ConsisIDLatent(16, 0.7)
    except Exception as e:  # a changed class fails in many ways: said in the log
        return [f"{where} ({type(e).__name__}: {str(e)[:80]})"]
    return [] if all(torch.isfinite(t).all() for t in steps) and steps[1].shape == x.shape else [where]


def _patches() -> list[str]:
    found = _missing(comfy.model_patcher.ModelPatcher, (
        "clone", "add_object_patch", "add_wrapper_with_key", "model_size", "get_model_object"), "ModelPatcher")
    holder = types.SimpleNamespace(part=types.SimpleNamespace())
    try:  # how ModelPatcher sets an object patch: one the model lacks is added, then taken away again
        before = comfy.utils.set_attr(holder, "part.consisid_probe", 1)
        comfy.utils.set_attr(holder, "part.consisid_probe", before)
        added = before is comfy.utils.ATTR_UNSET and not hasattr(holder.part, "consisid_probe")
    except Exception:  # a changed set_attr: said below
        added = False
    if not added:
        found.append("comfy.utils.set_attr with ATTR_UNSET (object patches adding attributes)")
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(executor.class_obj)
        return executor(*args, **kwargs)

    try:
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(lambda *a, **k: (a, k), holder, [wrapper])
        called = executor.execute(1, key=2) == ((1,), {"key": 2}) and seen == [holder]
    except Exception:  # a changed executor: said below
        called = False
    kind = getattr(getattr(comfy.patcher_extension, "WrappersMP", None), "DIFFUSION_MODEL", None)
    if not called or not isinstance(kind, str) or "WrappersMP.DIFFUSION_MODEL" not in _source(CogVideoXTransformer3DModel.forward):
        found.append("comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL around CogVideoX (the executor's class_obj)")
    return found


def _conds() -> list[str]:
    found = [f"comfy.conds.{n}" for n in ("CONDRegular", "CONDConstant") if not callable(getattr(comfy.conds, n, None))]
    given = [[torch.zeros(1), {"a": 1}]]
    try:
        out = node_helpers.conditioning_set_values(given, {"b": 2})
        kept = out[0][1] == {"a": 1, "b": 2} and given[0][1] == {"a": 1}
    except Exception:  # a changed helper: said below
        kept = False
    return found + ([] if kept else ["node_helpers.conditioning_set_values(conditioning, values)"])


def _percent() -> list[str]:
    setting = _source(getattr(comfy.samplers, "_calc_cond_batch", None))
    return [] if 'transformer_options["sigmas"] = ' in setting else [
        'comfy.samplers._calc_cond_batch setting transformer_options["sigmas"]']


def _dynamic_cfg() -> list[str]:
    found = []
    if not fence.takes(getattr(comfy.model_patcher.ModelPatcher, "set_model_sampler_cfg_function", None),
                       "sampler_cfg_function", "disable_cfg1_optimization"):
        found.append("ModelPatcher.set_model_sampler_cfg_function(sampler_cfg_function, disable_cfg1_optimization=)")
    seen = {}

    def cfg(args):
        seen.update(args)
        return args["cond"]

    x = torch.ones(1)
    try:
        comfy.samplers.cfg_function(None, x, x, 2.0, x, x, {"sampler_cfg_function": cfg})
    except Exception:  # a changed function: said below
        pass
    if not {"cond", "uncond", "cond_scale", "sigma", "model", "model_options"} <= set(seen):
        found.append("comfy.samplers.cfg_function's sampler_cfg_function args (cond, uncond, cond_scale, sigma, model, model_options)")
    if '["sample_sigmas"] = ' not in _source(getattr(getattr(comfy.samplers, "CFGGuider", None), "inner_sample", None)):
        found.append('comfy.samplers.CFGGuider.inner_sample setting transformer_options["sample_sigmas"]')
    return found


def _dpm() -> list[str]:
    if not fence.takes(getattr(comfy.samplers, "KSAMPLER", None), "sampler_function", "extra_options"):
        return ["comfy.samplers.KSAMPLER(sampler_function, extra_options=)"]
    drawn = []

    def noise(_sigma, _next):
        drawn.append(1)
        return torch.zeros(1, 1)

    class Denoiser:  # what samplers are given: the model's prediction, and the MODEL it comes from
        inner_model = types.SimpleNamespace(model_patcher=types.SimpleNamespace(get_model_object=lambda _name: sampling))

        def __call__(self, x, _sigma, **_):
            return x * 0.5

    where = "comfy.k_diffusion.sampling.sample_dpmpp_2m_sde(..., eta=, s_noise=, noise_sampler=, solver_type=)"
    try:
        sampling = ModelSamplingConsisID()
        comfy.k_diffusion.sampling.sample_dpmpp_2m_sde(
            Denoiser(), torch.ones(1, 1), torch.tensor([0.8, 0.4, 0.0]), {}, None, True,
            eta=1.0, s_noise=1.0, noise_sampler=noise, solver_type="midpoint")
    except Exception as e:  # a changed sampler: said in the log
        return [f"{where} ({type(e).__name__}: {str(e)[:80]})"]
    return [] if drawn else [where]


def _lora() -> list[str]:
    found = []
    if not fence.takes(getattr(comfy.sd, "load_lora_for_models", None), "model", "clip", "lora", "strength_model", "strength_clip"):
        found.append("comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)")
    weights = {"diffusion_model.m.lora_A.weight": torch.ones(1, 2), "diffusion_model.m.lora_B.weight": torch.ones(2, 1),
               "diffusion_model.m.alpha": torch.tensor(1.0)}
    try:
        patches = comfy.lora.load_lora(weights, {"diffusion_model.m": "diffusion_model.m.weight"}, log_missing=False)
    except Exception:  # a changed loader: said below
        patches = {}
    if list(patches) != ["diffusion_model.m.weight"] or not callable(getattr(comfy.lora, "model_lora_keys_unet", None)):
        found.append("comfy.lora.load_lora of diffusion_model.<layer>.lora_A/lora_B/alpha, model_lora_keys_unet")
    return found


def _vae_class():
    return getattr(cogvideo_vae, "AutoencoderKLCogVideoX", None)


def _vae() -> list[str]:
    return [] if isinstance(_vae_class(), type) else ["comfy.ldm.cogvideo.vae.AutoencoderKLCogVideoX"]


def _loads_with_memory() -> list[str]:
    load = getattr(comfy.model_management, "load_models_gpu", None)
    return [] if fence.takes(load, "models", "memory_required") else ["comfy.model_management.load_models_gpu(models, memory_required=)"]


def _reference_decode() -> list[str]:
    found = [] if callable(getattr(_vae_class(), "_decode_batched", None)) else [
        "comfy.ldm.cogvideo.vae.AutoencoderKLCogVideoX._decode_batched"]
    if not callable(getattr(comfy.model_management, "soft_empty_cache", None)):
        found.append("comfy.model_management.soft_empty_cache")
    return found + _loads_with_memory()


def _face_patcher() -> list[str]:
    names = ("set_additional_models", "get_additional_models_with_key", "get_nested_additional_models", "is_dynamic")
    return [f"ModelPatcher.{n}" for n in names if not callable(getattr(comfy.model_patcher.ModelPatcher, n, None))]


def _first_frame_sample() -> list[str]:
    encoder = getattr(cogvideo_vae, "Encoder3D", None)
    found = [] if fence.takes(getattr(encoder, "forward", None), "x", "conv_cache") else [
        "comfy.ldm.cogvideo.vae.Encoder3D.forward(x, conv_cache=)"]
    return found + _loads_with_memory()


def _devices() -> list[str]:
    return _missing(comfy.model_management, ("intermediate_device",), "comfy.model_management")


_FACE_MODEL = "ConsisID Native Model Loader and ConsisID Face Layers refuse"
ASSUMPTIONS = (
    fence.Assumption("native_cogvideox", "the native ConsisID nodes", UNAVAILABLE, _native_cogvideox, quiet=True),
    fence.Assumption("native_load", "ConsisID Native Model Loader (core's CogVideoX from ConsisID's weights)",
                     "the Native Model Loader refuses (Load Diffusion Model of the exported transformer with ConsisID "
                     "Face Layers may still work)", _load, needs="native_cogvideox"),
    fence.Assumption("native_transformer", "the face layers in ComfyUI's CogVideoX transformer", _FACE_MODEL,
                     _transformer, needs="native_cogvideox"),
    fence.Assumption("native_model_sampling", "ConsisID's schedule and latent format on the MODEL", _FACE_MODEL,
                     _model_sampling, needs="native_cogvideox"),
    fence.Assumption("native_patches", "the face layers as patches on a MODEL", _FACE_MODEL, _patches,
                     needs="native_cogvideox"),
    fence.Assumption("native_conds", "Identity Conditioning's identity on the conditioning",
                     "ConsisID Identity Conditioning refuses", _conds, needs="native_cogvideox"),
    fence.Assumption("native_percent", "Identity Conditioning's start_percent and end_percent",
                     "Identity Conditioning refuses a start_percent above 0 or an end_percent below 1", _percent,
                     needs="native_cogvideox"),
    fence.Assumption("native_dynamic_cfg", "ConsisID Dynamic CFG", "ConsisID Dynamic CFG refuses", _dynamic_cfg,
                     needs="native_cogvideox"),
    fence.Assumption("native_dpm", "ConsisID DPM Sampler", "ConsisID DPM Sampler refuses", _dpm, needs="native_cogvideox"),
    fence.Assumption("native_lora", "ConsisID Native LoRA", "ConsisID Native LoRA refuses (core's LoRA loaders of the "
                     "exported LoRA may still work)", _lora, needs="native_cogvideox"),
    fence.Assumption("native_vae", "ComfyUI's CogVideoX VAE", "ConsisID Identity Conditioning and Native VAE Decode refuse",
                     _vae, needs="native_cogvideox"),
    fence.Assumption("native_reference_decode", "ConsisID Native VAE Decode's reference order",
                     "it decodes as core VAE Decode does, and the frames differ a little from the reference's",
                     _reference_decode, needs="native_vae"),
    fence.Assumption("native_first_frame_sample", "Identity Conditioning's first_frame_seed",
                     "the first frame's latent is the posterior mean (as core VAE Encode), whatever the seed",
                     _first_frame_sample, needs="native_vae"),
    fence.Assumption("native_face_patcher", "the native MODEL's face layers, loaded beside it",
                     "ConsisID Native Model Loader and Face Layers refuse in one line", _face_patcher,
                     needs="native_cogvideox"),
    fence.Assumption("native_devices", "where the native nodes keep latents",
                     "latents are kept on the CPU", _devices,
                     needs="native_cogvideox"),
)
"""What the native path assumes of ComfyUI, checked with the wrapper's by `fence.check`."""
FACE_MODEL = ("native_transformer", "native_model_sampling", "native_patches")
"""What a ConsisID MODEL (face layers on core's CogVideoX) needs."""


def require(feature: str | tuple[str, ...] = "native_cogvideox", option: str = "this native ConsisID node") -> None:
    """Refuse `option` in one line on a ComfyUI without native CogVideoX, or where a `feature` differs."""
    if not AVAILABLE:
        raise fence.ComfyApiError(UNAVAILABLE)
    for one in (feature,) if isinstance(feature, str) else feature:
        fence.require(one, option)


def instance_parts(owner, names: tuple[str, ...], what: str, option: str) -> None:
    """Refuse `option` in one line when `owner` (an object ComfyUI made, e.g. its VAE) lacks one of
    the attributes the native path uses: these exist only on instances, so no probe sees them at load."""
    missing = [n for n in names if not hasattr(owner, n)]
    if missing:
        raise fence.ComfyApiError(
            f"{option} needs ComfyUI internals that this ComfyUI ({fence.comfyui_version()}) does not have as expected "
            f"({what} lacks {', '.join(missing)}): use a ComfyUI version this pack declares (see its README)"
        )


# ---------------------------------------------------------------------------------------------
# Model sampling


def _core_class(path: str) -> tuple[type, ...]:
    """A core class to build on, as a tuple of bases: empty outside ComfyUI or where it is gone
    (`native_model_sampling` says so, and the nodes that need it refuse)."""
    module, _, name = path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None) if AVAILABLE else None
    return (found,) if isinstance(found, type) else ()


class VPredictionFlow(*_core_class("comfy.model_sampling.CONST")):
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


class ModelSamplingConsisID(*_core_class("comfy.model_sampling.ModelSamplingDiscrete"), VPredictionFlow):
    """ConsisID's schedule (the checkpoint's scheduler config, as diffusers computes ᾱ) as ComfyUI
    model sampling: 1000 discrete timesteps, σ_999 = 1."""

    def __init__(self, scheduler_config=None):
        torch.nn.Module.__init__(self)
        sigmas = flow_sigmas(scheduler_config)
        self.num_timesteps = len(sigmas)
        self.zsnr = True
        self.set_sigmas(sigmas)
        self.sigma_data = 1.0


class ConsisIDLatent(*_core_class("comfy.latent_formats.CogVideoX")):
    """The checkpoint's own latent channels and scaling factor (0.7 and 16 for the released one)."""

    def __init__(self, channels: int, scale_factor: float):
        super().__init__()
        self.latent_channels = channels
        self.scale_factor = scale_factor
        if channels != 16:
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None


# ---------------------------------------------------------------------------------------------
# The face layers on a CogVideoX MODEL

FACE_LAYERS = "consisid_face"
"""The key of the face layers' patcher among a ConsisID MODEL's additional models, and of its wrapper."""
IDENTITY_KEYS = ("consisid_id_cond", "consisid_id_vit_hidden")
OPTION_KEYS = ("consisid_strength", "consisid_start", "consisid_end")


def _extra_conds(model_base, config, **kwargs):
    """Core CogVideoX's extra_conds plus the identity (the same for every CFG pass it is set on),
    refused here, as the sampler takes the conditioning in, if the face layers of `config` cannot
    take it."""
    out = type(model_base).extra_conds(model_base, **kwargs)
    if kwargs.get("consisid_id_cond") is not None:
        check_identity_fits(config, kwargs["consisid_id_cond"], kwargs["consisid_id_vit_hidden"])
        for key in IDENTITY_KEYS:
            out[key] = comfy.conds.CONDRegular(kwargs[key])
        for key in OPTION_KEYS:
            out[key] = comfy.conds.CONDConstant(float(kwargs[key]))
    return out


def _face_wrapper(face: FaceLayers, sampling, executor, x, timestep, context, ofs=None, transformer_options=None,
                  **kwargs):
    """Around the transformer's `_forward`: the identity's cross-attention after its blocks, and
    the output checked finite (a NaN step is named here, not found as a black video)."""
    id_cond, hidden = (kwargs.pop(key, None) for key in IDENTITY_KEYS)
    strength, start, end = (kwargs.pop(key, None) for key in OPTION_KEYS)
    model = executor.class_obj
    if id_cond is None or not strength or not _active(sampling, transformer_options, start, end):
        return _finite(executor(x, timestep, context, ofs, transformer_options, **kwargs))
    if all(torch.equal(t, t[:1].expand_as(t)) for t in (id_cond, hidden)):
        # one identity on every CFG pass (as the reference): its tokens once, broadcast in the cross-attention
        id_cond, hidden = id_cond[:1], hidden[:1]
    tokens = face_tokens_once(face, id_cond, hidden, transformer_options)

    def add(which, _block, _args, output):
        hidden_states, encoder_hidden_states = output
        return hidden_states + strength * face.cross_attention(which, tokens, hidden_states), encoder_hidden_states

    hooks = [
        block.register_forward_hook(functools.partial(add, face.after_block(i)))
        for i, block in enumerate(model.blocks)
        if face.after_block(i) is not None
    ]
    try:
        return _finite(executor(x, timestep, context, ofs, transformer_options, **kwargs))
    finally:
        for hook in hooks:
            hook.remove()


def check_identity_fits(config, id_cond: torch.Tensor, hidden: torch.Tensor) -> None:
    """Refuse an identity (id_cond [B, D], hidden states [B, scales, tokens, width]) that the face
    layers of `config` cannot take."""
    found = (id_cond.shape[-1], hidden.shape[1], hidden.shape[-1])
    if found != (config["LFE_id_dim"], config["LFE_num_scale"], config["LFE_vit_dim"]):
        raise IdentityError(
            f"the identity does not fit this model: id_cond of width {found[0]} and {found[1]} hidden states of "
            f"width {found[2]}, the face layers take {config['LFE_id_dim']}, {config['LFE_num_scale']} and "
            f"{config['LFE_vit_dim']}: make the identity with this checkpoint's face models"
        )


def _finite(output: torch.Tensor) -> torch.Tensor:
    check_tensors([("output", output)], "ConsisID's transformer step", LATENT_CAUSE, limit=float("inf"))
    return output


def _active(sampling, transformer_options, start: float, end: float) -> bool:
    """Whether this step lies within [start, end] percent of the sampling (ComfyUI's convention:
    percent of the model's sigma range, as ControlNet's start/end)."""
    if start <= 0 and end >= 1:
        return True
    sigmas = (transformer_options or {}).get("sigmas")
    if sigmas is None:
        return True
    sigma = float(sigmas.max())
    return sampling.percent_to_sigma(end) <= sigma <= sampling.percent_to_sigma(start)


TRANSFORMER_PARTS = ("blocks", "dim", "attention_head_dim", "out_channels")
"""What the face layers use of core's CogVideoX transformer instance."""


def _cogvideox(model, option: str):
    """The CogVideoX transformer of a MODEL (`ModelPatcher`), refused in one line if it has none."""
    core = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(core, CogVideoXTransformer3DModel):
        found = type(core if core is not None else model).__name__
        raise ConsisIDError(f"this MODEL is a {found}, not ComfyUI's CogVideoX: connect ConsisID Native Model Loader's "
                            "MODEL, or the exported ConsisID transformer from Load Diffusion Model")
    instance_parts(core, TRANSFORMER_PARTS, "CogVideoXTransformer3DModel", option)
    return core


def with_face_layers(model, face: FaceLayers, latent_channels: int, scaling_factor: float, scheduler_config=None,
                      option: str = "ConsisID Face Layers"):
    """A clone of a CogVideoX MODEL (`ModelPatcher`) that is ConsisID: face layers, rotary
    embedding, model sampling, latent format and identity conditioning added as patches."""
    require((*FACE_MODEL, "native_face_patcher"), option)
    core = _cogvideox(model, option)
    base = model.model
    config = face.config
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if core.dim != width or len(core.blocks) != config["num_layers"] or core.attention_head_dim != config["attention_head_dim"]:
        raise ConsisIDError(
            f"these face layers are for a transformer {width} wide with {config['num_layers']} blocks of "
            f"{config['attention_head_dim']}-wide heads; this MODEL is {core.dim} wide with {len(core.blocks)} blocks of "
            f"{core.attention_head_dim}-wide heads: use the face file exported with this transformer"
        )
    if latent_channels != core.out_channels:
        raise ConsisIDError(f"the face layers' settings give {latent_channels} latent channels, this MODEL makes "
                            f"{core.out_channels}: use the face file exported with this transformer")
    sampling = ModelSamplingConsisID(scheduler_config)
    patched = model.clone()
    # in the dtype the transformer computes in (not fp8 storage: the extractor's own parameters are used as
    # they are), held beside the MODEL in a patcher of its kind (dynamic VRAM's when the MODEL's is)
    face = face.to(dtype=getattr(base, "get_dtype_inference", base.get_dtype)())
    patched.set_additional_models(FACE_LAYERS, [managed.held_beside(patched, face)])
    patched.add_object_patch("diffusion_model._get_rotary_emb", functools.partial(_rotary, config))
    patched.add_object_patch("model_sampling", sampling)
    patched.add_object_patch("latent_format", ConsisIDLatent(latent_channels, scaling_factor))
    patched.add_object_patch("extra_conds", functools.partial(_extra_conds, base, config))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS,
                                 functools.partial(_face_wrapper, face, sampling))
    per_run_state(patched)
    on_several_devices(patched)
    cpu_attention(patched)
    return patched


def face_patcher(model):
    """The patcher holding a ConsisID MODEL's face layers (`with_face_layers`)."""
    (patcher,) = model.get_additional_models_with_key(FACE_LAYERS)
    return patcher


def _rotary(config, height, width, frames, device=None):
    return rotary_embedding(config, height, width, frames, device)


def load_cogvideox(state_dict: dict, dtype: torch.dtype | None):
    """Core's own CogVideoX MODEL from weights in its key layout (what UNETLoader does)."""
    require("native_load", "ConsisID Native Model Loader")
    options = {} if dtype is None else {"dtype": dtype}
    model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options)
    if model is None:
        raise ConsisIDError("ComfyUI did not recognise these weights as CogVideoX: use a ConsisID checkpoint")
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


ENCODE_PARTS = ("encode", "process_input", "memory_used_encode", "vae_dtype", "device", "output_device", "patcher",
                "latent_channels")
DECODE_PARTS = ("decode", "memory_used_decode", "process_output", "vae_dtype", "device", "output_device", "patcher",
                "latent_channels")
"""What the native nodes use of core's VAE (`comfy.sd.VAE`): set on each instance, checked where used."""


def check_vae(vae, parts: tuple[str, ...], option: str) -> None:
    """Refuse a VAE that is not CogVideoX's (core Load VAE of the checkpoint's VAE), or lacks what `option` uses."""
    require("native_vae", option)
    module = getattr(vae, "first_stage_model", None)
    if not isinstance(module, _vae_class()):
        raise ConsisIDError(f"this VAE is a {type(module if module is not None else vae).__name__}, not CogVideoX's: "
                            "load the ConsisID checkpoint's vae/diffusion_pytorch_model.safetensors with Load VAE")
    instance_parts(vae, parts, "comfy.sd.VAE", option)


def encode_first_frame(vae, pixels: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The first frame's latent [1, C, 1, h, w] from an IMAGE [1, H, W, 3]: core VAE Encode's
    posterior mean, or with `seed` the posterior sampled as ConsisIDPipeline samples it for that
    seed (so ConsisID Noise with the same seed gives the reference's video)."""
    encoder = getattr(vae.first_stage_model, "encoder", None)
    if seed is None or encoder is None or not fence.works("native_first_frame_sample"):
        return vae.encode(pixels)
    x = vae.process_input(pixels).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, 1, H, W], as core's encode
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(x.shape, vae.vae_dtype))
    with torch.inference_mode():
        moments, _ = encoder(x.to(device=vae.device, dtype=vae.vae_dtype), conv_cache=None)
    return posterior_sample(moments.to(vae.output_device), seed).to(intermediate_device(), torch.float32)


def latent_channels(vae) -> int:
    return vae.latent_channels


def intermediate_device():
    return comfy.model_management.intermediate_device() if fence.works("native_devices") else torch.device("cpu")


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
    require("native_dpm", "ConsisID DPM Sampler")
    return comfy.samplers.KSAMPLER(_reference_dpm, extra_options={"noise_seed": noise_seed})


def with_dynamic_cfg(model):
    """A clone of `model` whose CFG scale follows the reference's cosine schedule each step."""
    require("native_dynamic_cfg", "ConsisID Dynamic CFG")
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
    require("native_lora", "ConsisID Native LoRA")
    check_lora_fits(lora, _cogvideox(model, "ConsisID Native LoRA"))
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy_lora_tensors(lora), strength, 0)
    return patched


def decode_in_reference_order(vae, samples: torch.Tensor) -> torch.Tensor:
    """A CogVideoX LATENT ([B, C, T, h, w], as samplers return it) decoded by core's VAE module in
    the order diffusers (and CogVideoX's own code) decodes: two latent frames at a time, the odd
    one with the first. Core's `decode` runs the temporal layers on the whole video and the rest in
    chunks of four frames, so its group norms see other frames and the pixels differ. Returns an
    IMAGE [B·F, H, W, 3]; one video at a time, Cancel checked between them. The latent is checked
    (`checks.check_latent`) before any of it."""
    check_vae(vae, DECODE_PARTS, "ConsisID Native VAE Decode")
    check_latent(samples, vae.latent_channels, 1, "connect the LATENT of a sampler on a native ConsisID MODEL")
    if not fence.works("native_reference_decode"):
        images = vae.decode(samples)
    else:
        try:
            images = _decode_videos(vae, vae.first_stage_model._decode_batched, samples)
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
            progress.check_interrupted()
            pixels = batched(video.to(device=vae.device, dtype=vae.vae_dtype))
            videos.append(vae.process_output(pixels.to(device=vae.output_device, dtype=torch.float32)).movedim(1, -1))
    return torch.cat(videos)


# =============================================================================================
# What the wrapper has, on the native MODEL: face tokens once per run, the step cache, several
# GPUs (MultiGPU CFG Split's deep clones).

RUN_STATE = "consisid_run"
STEP_CACHE = "consisid_step_cache"


class RunState:
    """What one sampling run of a native ConsisID MODEL keeps between its model calls: the
    identity's face tokens per device (the Local Facial Extractor's output, the same at every step,
    as the reference computes it once). Made afresh for each run by `_per_run`, dropped after it."""

    def __init__(self):
        self.tokens: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _per_run(key: str, make, executor, *args, **kwargs):
    """An OUTER_SAMPLE wrapper: `make(sigmas)` (the run's sigmas) in the guider's transformer_options
    under `key` for this run, on a copy of its model options put back after the run."""
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    guider.model_options.setdefault("transformer_options", {})[key] = make(sigmas)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original


def per_run_state(model) -> None:
    """`model` (a clone being made ConsisID) keeps a `RunState` for each sampling run."""
    if fence.works("native_per_run"):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "consisid_face",
                                   functools.partial(_per_run, RUN_STATE, lambda _sigmas: RunState()))


def face_tokens_once(face: FaceLayers, id_cond: torch.Tensor, hidden: torch.Tensor, transformer_options) -> torch.Tensor:
    """The face tokens of the identity (`id_cond`, `hidden` as the conditioning carries them),
    computed once per run and device: later calls with the same identity reuse them."""
    run = (transformer_options or {}).get(RUN_STATE)
    known = None if run is None else run.tokens.get(id_cond.device)
    if known is not None and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(known, (id_cond, hidden))):
        return known[2]
    tokens = face.face_tokens(id_cond, list(hidden.unbind(1)))
    if run is not None:
        run.tokens[id_cond.device] = (id_cond, hidden, tokens)
    return tokens


class StepCacheRun:
    """The step cache in one sampling run: the wrapper's TeaCache decision (`TeaCacheState`, ConsisID's
    coefficients) once per step, and per batch of conditionings the residual the transformer's
    blocks (and the face cross-attention between them) added to the video tokens when last computed."""

    def __init__(self, threshold: float, sigmas: torch.Tensor):
        self.stats = StepCacheStats()
        self.state = TeaCacheState(threshold, len(sigmas) - 1, self.stats)
        self.sigma: float | None = None
        self.residuals: dict[tuple, torch.Tensor] = {}
        self.lock = threading.Lock()  # MultiGPU CFG Split calls the model from one thread per device

    def decide(self, sigma: float, emb: torch.Tensor) -> None:
        """At the first call of a step (a new sigma), the decision for every call of that step."""
        with self.lock:
            if sigma != self.sigma:
                self.sigma = sigma
                self.state.decide(emb)


class _CachedCall:
    """One transformer call under the step cache: forward hooks on core CogVideoX's time embedding
    (this step's embedding), first block (the video tokens going in) and final norm (the video
    tokens after all blocks); a skipped call runs no block, its final norm gets the residual."""

    def __init__(self, model, run: StepCacheRun, key: tuple, sigma: float):
        self.model, self.run, self.key, self.sigma = model, run, key, sigma
        self.blocks = model.blocks
        self.skipped = False
        self.start: torch.Tensor | None = None

    def __enter__(self):
        self.hooks = [
            self.model.time_embedding_linear_2.register_forward_hook(self._embedded),
            self.blocks[0].register_forward_pre_hook(self._entering, with_kwargs=True),
            self.model.norm_final.register_forward_pre_hook(self._leaving),
        ]
        return self

    def __exit__(self, *_exc):
        for hook in self.hooks:
            hook.remove()
        self.model.blocks = self.blocks

    def _embedded(self, _module, _args, emb):
        self.run.decide(self.sigma, emb)
        self.skipped = self.run.state.skip and self.key in self.run.residuals
        if self.skipped:
            self.model.blocks = torch.nn.ModuleList()  # this call only (put back on exit)

    def _entering(self, _module, args, kwargs):
        self.start = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _leaving(self, _module, args):
        hidden_states, *rest = args
        if self.skipped:
            return (hidden_states + self.run.residuals[self.key], *rest)
        self.run.residuals[self.key] = hidden_states - self.start
        self.run.state.residual = self.run.residuals
        return None


def _step_cache_wrapper(executor, x, timestep, context, ofs=None, transformer_options=None, **kwargs):
    """Around the transformer's `_forward`: the blocks skipped when the step cache says so."""
    options = transformer_options or {}
    run: StepCacheRun | None = options.get(STEP_CACHE)
    if run is None or options.get("sigmas") is None or not fence.works("native_step_cache"):
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    key = (tuple(options.get("uuids") or ()), tuple(x.shape), x.device)  # per batch of conds, per device
    with _CachedCall(executor.class_obj, run, key, float(options["sigmas"].flatten()[0])):
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)


def _step_cache_run(threshold: float, executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh `StepCacheRun` for the run, and what it did logged after it."""
    runs = []

    def make(sigmas):
        runs.append(StepCacheRun(threshold, sigmas))
        return runs[-1]

    try:
        return _per_run(STEP_CACHE, make, executor, *args, **kwargs)
    finally:
        if runs:
            stats = runs[0].stats
            logger.info("ConsisID Step Cache: %d transformer steps computed, %d skipped", stats.computed, stats.skipped)


def with_step_cache(model, threshold: float):
    """A clone of a native ConsisID MODEL whose sampling runs skip the transformer's blocks on the
    steps TeaCache (ConsisID's coefficients, the wrapper's `step_cache`) finds close to the last
    computed one. Threshold 0 is off: the clone is unpatched."""
    _cogvideox(model, "ConsisID Step Cache")
    patched = model.clone()
    if threshold > 0:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, STEP_CACHE,
                                     functools.partial(_step_cache_run, threshold))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STEP_CACHE, _step_cache_wrapper)
    return patched


def _own_copies(primary, clone) -> None:
    """ON_DEEPCLONE_MULTIGPU / ON_MATCH_MULTIGPU_CLONES: a MultiGPU clone has a model of its own (for
    another device), and core gave it its own face-layers patcher (`face_patcher`, deep-cloned from
    the factory `with_face_layers` set). Its face wrapper, model sampling and `extra_conds` are made
    to use its own: shared with the primary's, they would compute on the primary's device."""
    if clone.model is primary.model:
        return
    face = face_patcher(clone).model.module
    _, sampling = clone.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS)[0].args
    sampling = copy.deepcopy(sampling)
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FACE_LAYERS,
                               functools.partial(_face_wrapper, face, sampling))
    clone.object_patches["model_sampling"] = sampling
    clone.object_patches["extra_conds"] = functools.partial(_extra_conds, clone.model, face.config)


def on_several_devices(model) -> None:
    """`model` (a clone being made ConsisID) gives MultiGPU CFG Split's clones their own face layers:
    core deep-clones its face patcher from a factory of fresh copies, and `_own_copies` rewires them."""
    if fence.works("native_multigpu"):
        patcher = face_patcher(model)
        patcher.cached_patcher_init = (_face_copy, (model, patcher.model.module))
        for event in (comfy.patcher_extension.CallbacksMP.ON_DEEPCLONE_MULTIGPU,
                      comfy.patcher_extension.CallbacksMP.ON_MATCH_MULTIGPU_CLONES):
            model.add_callback(event, _own_copies)


def _face_copy(model, face: FaceLayers, disable_dynamic: bool = False):
    """A patcher of its own for a copy of `face` (what core reloads an additional model with)."""
    return managed.held_beside(model, copy.deepcopy(face), disable_dynamic)


def _reload_cogvideox(source: str, dtype: torch.dtype | None, quantize: str | None, disable_dynamic: bool = False):
    core = model_parts(source, quant=quantize).core
    options = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.load_diffusion_model_state_dict(core, model_options=options, disable_dynamic=disable_dynamic)


def reloadable(model, source, dtype: torch.dtype | None, quantize: str | None) -> None:
    """Give core's CogVideoX MODEL loaded from `source` by the native loader what UNETLoader's MODELs
    have: the factory ComfyUI reloads it with for another device (MultiGPU CFG Split) or without
    dynamic VRAM (`cached_patcher_init`)."""
    if fence.works("native_multigpu"):
        model.cached_patcher_init = (_reload_cogvideox, (str(source), dtype, quantize))


def _multigpu() -> list[str]:
    found = [f"comfy.patcher_extension.CallbacksMP.{n}" for n in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES")
             if not hasattr(comfy.patcher_extension.CallbacksMP, n)]
    patcher = comfy.model_patcher.ModelPatcher
    if not fence.takes(getattr(patcher, "deepclone_multigpu", None), "new_load_device"):
        found.append("comfy.model_patcher.ModelPatcher.deepclone_multigpu(new_load_device=)")
    if not fence.takes(comfy.sd.load_diffusion_model_state_dict, "sd", "model_options", "disable_dynamic"):
        found.append("comfy.sd.load_diffusion_model_state_dict(sd, model_options=, disable_dynamic=)")
    return found



def cpu_attention(model) -> None:
    """On a CPU where ComfyUI chose its sub-quadratic attention by default (not asked for with
    --use-quad-cross-attention), `model` (a clone being made ConsisID) attends with PyTorch's SDPA,
    as diffusers and our Sampler do: its flash kernel needs no more memory there, and ComfyUI's
    chunked attention made a step take about a fifth longer (bench/RESULTS.md, native-medium)."""
    attention = comfy.ldm.modules.attention
    chosen = getattr(comfy.ldm.cogvideo.model, "optimized_attention", None)
    if (model.load_device.type == "cpu" and chosen is attention.attention_sub_quad
            and not comfy.cli_args.args.use_quad_cross_attention and fence.works("native_cpu_attention")):
        model.set_model_optimized_attention(attention.attention_pytorch)

def _tiny_cogvideox():
    """Core's CogVideoX at a few numbers wide, with small random weights (the probes' model)."""
    model = CogVideoXTransformer3DModel(  # torch's own layers: see `_block_outputs`
        num_attention_heads=1, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=8,
        num_layers=2, sample_width=4, sample_height=4, sample_frames=1, use_rotary_positional_embeddings=True,
        device="meta", operations=torch.nn,
    ).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _step_cache_probe() -> list[str]:
    """Two calls of a tiny core CogVideoX under the step cache, the second a step that it skips: the
    hooks it sets fire in the order `_CachedCall` needs, and the skipped call runs no block and
    gives the first call's output (the same input)."""
    model = _tiny_cogvideox()
    x, timestep, context = torch.randn(1, 4, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 2, 8)
    run = StepCacheRun(10.0, torch.ones(4))
    ran = []
    counting = model.blocks[0].register_forward_hook(lambda *_: ran.append(1))
    outputs = []
    try:
        for sigma in (1.0, 0.5):
            with torch.no_grad(), _CachedCall(model, run, (), sigma):
                outputs.append(model(x, timestep, context))
    except Exception as e:  # what differs is reported, not raised
        return [f"comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel._forward's layers ({type(e).__name__}: {e})"]
    finally:
        counting.remove()
    if len(ran) != 1 or run.stats.skipped != 1 or not torch.allclose(outputs[0], outputs[1], atol=1e-6):
        return ["comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel._forward's order (time_embedding_linear_2, "
                "blocks, norm_final)"]
    return []


def _attention_override() -> list[str]:
    """A tiny core CogVideoX given an attention override in its transformer_options (what
    ModelPatcher.set_model_optimized_attention sets) calls it in its blocks."""
    attention = comfy.ldm.modules.attention
    found = [f"comfy.ldm.modules.attention.{n}" for n in ("attention_pytorch", "attention_sub_quad")
             if not callable(getattr(attention, n, None))]
    if not callable(getattr(comfy.model_patcher.ModelPatcher, "set_model_optimized_attention", None)):
        found.append("comfy.model_patcher.ModelPatcher.set_model_optimized_attention")
    if found:
        return found
    calls = []
    options = {"optimized_attention_override": lambda real, *a, **k: calls.append(1) or real(*a, **k)}
    with torch.no_grad():
        _tiny_cogvideox()(torch.randn(1, 4, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 2, 8), transformer_options=options)
    return [] if len(calls) == 2 else ["the attention override in comfy.ldm.cogvideo.model's blocks (transformer_options)"]


def _outer_sample() -> list[str]:
    parameters = list(inspect.signature(comfy.samplers.CFGGuider.outer_sample).parameters)
    found = [] if parameters[1:5] == ["noise", "latent_image", "sampler", "sigmas"] else [
        "comfy.samplers.CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, …)"]
    if not callable(getattr(comfy.model_patcher, "create_model_options_clone", None)):
        found.append("comfy.model_patcher.create_model_options_clone")
    return found + [f"comfy.patcher_extension.WrappersMP.{n}" for n in ("OUTER_SAMPLE", "DIFFUSION_MODEL")
                    if not hasattr(comfy.patcher_extension.WrappersMP, n)]


ASSUMPTIONS += (
    fence.Assumption("native_per_run", "the native MODEL's face tokens once per run",
                     "the face tokens are computed at every step (same video, slower)", _outer_sample,
                     needs="native_cogvideox"),
    fence.Assumption("native_step_cache", "ConsisID Step Cache", "ConsisID Step Cache is refused in one line",
                     _step_cache_probe, needs="native_per_run"),
    fence.Assumption("native_cpu_attention", "the native MODEL's attention on a CPU",
                     "it uses the attention ComfyUI chose (its sub-quadratic one by default on a CPU: slower)",
                     _attention_override, needs="native_cogvideox"),
    fence.Assumption("native_multigpu", "MultiGPU CFG Split on the native MODEL",
                     "the native MODEL runs on one device (MultiGPU CFG Split refuses ConsisID Native Model Loader's "
                     "MODEL, and shares the face layers of Load Diffusion Model's between devices)", _multigpu,
                     needs="native_cogvideox"),
)

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
    require("native_load", "ConsisID Native Model Loader's quantize")
    quant.check_format(name)
    problems = quant_problems()
    if name in problems:
        readable = [n for n in quant.FORMATS if n not in problems]
        raise fence.ComfyApiError(
            f"this ComfyUI ({fence.comfyui_version()}) does not read the quantized format '{name}' as the pack "
            f"writes it ({problems[name]}): pick {', '.join(readable) or 'off'}, or update ComfyUI and comfy-kitchen")
