"""The native path's nodes: ConsisID as a ComfyUI MODEL for core's samplers, identity as conditioning.

They run on ComfyUI's own CogVideoX (v0.21 and later); on an older ComfyUI each says so in one
line when used, and the wrapper nodes work as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...consisid_core import native, quant
from ...consisid_core.checkpoint import DTYPES
from ...consisid_core.single_file import RELEASED_TRANSFORMER_CONFIG
from ...consisid_core.checks import check_number, check_percent_range, check_seed, check_video_size
from ...consisid_core.errors import ConsisIDError
from ...consisid_core.face_layers import face_layers as build_face_layers
from ...consisid_core.files import shown
from ...consisid_core.identity import Identity
from ...consisid_core.lora import check_strength, read_lora
from ...consisid_core.reference import first_frame_pixels
from ...consisid_core.sampling import MAX_IDENTITY_STRENGTH, first_frame
from ...consisid_core.text import TextEmbeddings
from .. import folders, progress
from ..declared import (
    CONSISID_IDENTITY, CONSISID_TEXT, FIRST_IMAGE_TOOLTIP, FRAMES_TOOLTIP, IDENTITY_TOOLTIP, TEXT_TOOLTIP,
    checkpoint_names, checkpoint_source, declared_error, first_image, height_input, identity_strength_input, length_input,
    lora_strength_input, seed_input, width_input,
)
from . import comfy_parts

WEIGHT_DTYPES = {"default": None, **DTYPES}
RELEASED_SIZE = tuple(RELEASED_TRANSFORMER_CONFIG[k] * s for k, s in (("sample_frames", 1), ("sample_height", 8),
                                                                          ("sample_width", 8)))
"""(frames, height, width) ConsisID was trained at, (49, 480, 720): what Identity Conditioning's
work is bounded by (`checks.bounded_size`), as ConsisID Sampler's is by its checkpoint's."""


LOADER = "ConsisID Native Model Loader"


def native_model(source, dtype: torch.dtype | None, quantize: str | None = None):
    """A ConsisID checkpoint folder or single diffusers-named transformer file as a native MODEL:
    core's CogVideoX (its key layout) with the face layers added; with `quantize` (a
    `quant.FORMATS` name) its block linear layers in that core format, as `export --quant` writes
    them. Its parts come from `native.model_parts` (every file read as a checkpoint is, the scheduler
    config checked); Cancel between tensors and modules."""
    comfy_parts.require(("native_load", *comfy_parts.FACE_MODEL), LOADER)
    if quantize is not None:
        comfy_parts.require_format(quantize)
    parts = native.model_parts(source, progress.check_interrupted, quant=quantize)
    face = build_face_layers(parts.face, parts.config, progress.check_interrupted)
    progress.check_interrupted()
    model = comfy_parts.load_cogvideox(parts.core, dtype)
    comfy_parts.reloadable(model, source, dtype, quantize)
    return comfy_parts.with_face_layers(model, face, parts.latent_channels, parts.scaling_factor, parts.scheduler,
                                         LOADER)


def _model_file(kind: str, name: str) -> Path:
    try:
        return folders.file_path(kind, name)
    except FileNotFoundError as e:
        raise ConsisIDError(str(e)) from None


class ConsisIDNativeModelLoader:
    DISPLAY_NAME = LOADER
    DESCRIPTION = (
        "Loads ConsisID as a native ComfyUI MODEL for KSampler, SamplerCustomAdvanced, LoRA loaders and model "
        "patches: core's own CogVideoX transformer with ConsisID's face layers. Takes a checkpoint folder from "
        "models/consisid or a single transformer .safetensors with diffusers key names; `quantize` stores the "
        "transformer in one of ComfyUI's quantized formats as it loads. Condition it with ConsisID Identity "
        "Conditioning."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("ConsisID as a ComfyUI MODEL (v-prediction, zero-terminal-SNR; sample with the simple scheduler).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (checkpoint_names(), {"tooltip": "A ConsisID checkpoint folder, or diffusion_models/<file> for a "
                                                  "single-file transformer with diffusers key names."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default",
                                                       "tooltip": "Weights' precision; default lets ComfyUI choose "
                                                                  "for the device (fp32 on CPU)."}),
            },
            "optional": {
                "quantize": (["off", *quant.FORMATS], {
                    "default": "off",
                    "tooltip": "Store the transformer's block linear layers in one of ComfyUI's quantized formats as "
                               "it loads (what `export --quant` writes): 8-bit float8_e4m3fn, float8_e5m2, mxfp8, "
                               "int8_tensorwise; 4-bit nvfp4, convrot_w4a4, asym_w4a8_int8. The face layers stay "
                               "in full precision."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str):
        return declared_error(cls, model=model) or True

    def load(self, model: str, weight_dtype: str, quantize: str = "off"):
        comfy_parts.require(("native_load", *comfy_parts.FACE_MODEL), LOADER)
        if not isinstance(weight_dtype, str) or weight_dtype not in WEIGHT_DTYPES:
            raise ConsisIDError(f"weight_dtype '{shown(weight_dtype)}' is not one of {', '.join(WEIGHT_DTYPES)}")
        if not isinstance(quantize, str) or quantize not in ("off", *quant.FORMATS):
            raise ConsisIDError(f"quantize '{shown(quantize)}' is not one of off, {', '.join(quant.FORMATS)}")
        if not isinstance(model, str):
            raise ConsisIDError(f"model must be a name from the list, found {type(model).__name__}")
        try:
            source = checkpoint_source(model)
        except FileNotFoundError as e:
            raise ConsisIDError(str(e)) from None
        return (native_model(source, WEIGHT_DTYPES[weight_dtype], None if quantize == "off" else quantize),)


class ConsisIDFaceModules:
    DISPLAY_NAME = "ConsisID Face Layers"
    DESCRIPTION = (
        "Adds ConsisID's face layers (a <name>_face.safetensors written by `python -m consisid_core export`) to a "
        "CogVideoX MODEL loaded from the exported transformer by core Load Diffusion Model or ComfyUI-GGUF's "
        "Unet Loader (GGUF). The result takes ConsisID Identity Conditioning like ConsisID Native Model Loader's."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL as ConsisID: face layers, its rotary embedding and model sampling.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The exported ConsisID transformer, loaded as CogVideoX."}),
                "face_layers": (folders.files("diffusion_models"), {"tooltip": "The <name>_face.safetensors exported "
                                                                            "with that transformer (models/diffusion_models)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, face_layers: str):
        return declared_error(cls, face_layers=face_layers) or True

    def apply(self, model, face_layers: str):
        comfy_parts.require(comfy_parts.FACE_MODEL, self.DISPLAY_NAME)
        path = _model_file("diffusion_models", face_layers)
        weights, info = native.read_face_file(path, progress.check_interrupted)
        face = build_face_layers(weights, info["config"], progress.check_interrupted)
        return (comfy_parts.with_face_layers(model, face, info["latent_channels"], info["scaling_factor"], info["scheduler"]),)


class ConsisIDTextConditioning:
    DISPLAY_NAME = "ConsisID Text Conditioning"
    DESCRIPTION = (
        "ConsisID Text Encode's embeddings as ComfyUI CONDITIONING (positive, negative) for the native path, e.g. "
        "with the checkpoint's own T5. Core CLIPTextEncode over CLIPLoader (type cogvideox) gives the same kind."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "convert"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt's 226 T5 tokens.", "The negative prompt's 226 T5 tokens.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": (CONSISID_TEXT, {"tooltip": TEXT_TOOLTIP})}}

    def convert(self, text):
        if not isinstance(text, TextEmbeddings):
            raise ConsisIDError(f"text must be ConsisID Text Encode's output, found {type(text).__name__}")
        return ([[text.positive, {}]], [[text.negative, {}]])


CONDITIONING = "ConsisID Identity Conditioning"


class ConsisIDIdentityConditioning:
    DISPLAY_NAME = CONDITIONING
    DESCRIPTION = (
        "Puts a ConsisID identity and the first frame (by default the identity's aligned face, as the reference) "
        "on both conditionings, as core's WanImageToVideo does for its image, and makes the empty video latent. "
        "The identity acts in both CFG passes, as in the reference, between start and end percent of the steps."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = (
        "Positive conditioning with the identity and first frame.",
        "Negative conditioning with the identity and first frame (as the reference).",
        "An empty video latent of the size asked, for KSampler / SamplerCustomAdvanced.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt: CLIPTextEncode over CLIPLoader (type cogvideox)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt, encoded the same way."}),
                "identity": (CONSISID_IDENTITY, {"tooltip": IDENTITY_TOOLTIP}),
                "vae": ("VAE", {"tooltip": "The CogVideoX VAE (core Load VAE, e.g. the checkpoint's vae file)."}),
                "width": width_input(),
                "height": height_input(),
                "length": length_input(),
                "identity_strength": identity_strength_input("Scale of the face cross-attention (1 as trained)."),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Where in the sampling the identity starts acting (0: first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Where it stops (1: last step). 0, 1 and strength 1 are the reference."}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": FIRST_IMAGE_TOOLTIP}),
                "first_frame_seed": ("INT", {"default": -1, "min": -1, "max": 0xFFFFFFFFFFFFFFFF,
                                             "tooltip": "-1: the first frame's latent is the VAE posterior's mean (as "
                                                        "core VAE Encode). A seed: the posterior sampled as the "
                                                        "reference does for that seed; with ConsisID Noise at the same "
                                                        "seed the video is the command line's and ConsisID Sampler's."}),
                "allow_oversize": ("BOOLEAN", {"default": False,
                                               "tooltip": "Allow more than 8x ConsisID's 49 frames or 4x its 720x480 "
                                                          "pixels per frame (runs that cannot fit in memory still fail)."}),
            },
        }

    def encode(self, positive, negative, identity: Identity, vae, width: int, height: int, length: int,
               identity_strength: float, start_percent: float, end_percent: float, start_image=None,
               first_frame_seed: int = -1, allow_oversize: bool = False):
        comfy_parts.require("native_conds", CONDITIONING)
        length, height, width = check_video_size(length, height, width, RELEASED_SIZE, 16, 4,
                                                 allow_oversize=allow_oversize is True, names=("length", "height", "width"))
        strength = check_number("identity_strength", identity_strength, 0, MAX_IDENTITY_STRENGTH, "1 as trained")
        start, end = check_percent_range(start_percent, end_percent)
        if start > 0 or end < 1:
            comfy_parts.require("native_percent", f"{CONDITIONING}'s start_percent and end_percent")
        seed = None if first_frame_seed == -1 else check_seed(first_frame_seed, "first_frame_seed")
        if not isinstance(identity, Identity):
            raise ConsisIDError(f"identity must be a ConsisID identity (Face Embed, Load Identity), found "
                                f"{type(identity).__name__}")
        image = first_image(start_image, "start_image")
        comfy_parts.check_vae(vae, comfy_parts.ENCODE_PARTS, CONDITIONING)
        frame = first_frame(image, identity)
        pixels = first_frame_pixels(frame, height, width)
        latent = comfy_parts.encode_first_frame(vae, pixels, seed)
        return (*identity_conditioned(positive, negative, identity, latent, strength, start, end),
                {"samples": torch.zeros([1, comfy_parts.latent_channels(vae), (length - 1) // 4 + 1, height // 8, width // 8],
                                        device=comfy_parts.intermediate_device())})


def identity_conditioned(positive, negative, identity: Identity, first_latent: torch.Tensor, strength: float = 1.0,
                         start: float = 0.0, end: float = 1.0) -> tuple:
    """Both conditionings with the identity and the first frame's latent ([1, C, 1, h, w], VAE space)."""
    hidden = torch.stack(identity.id_vit_hidden, dim=1)
    return tuple(
        comfy_parts.identity_conditioning(c, first_latent, identity.id_cond, hidden, strength, start, end)
        for c in (positive, negative)
    )


class ConsisIDNoise:
    DISPLAY_NAME = "ConsisID Noise"
    DESCRIPTION = (
        "Noise for SamplerCustomAdvanced that is the reference's for a seed (diffusers' CPU generator, its draw order "
        "and latent layout): one seed gives one video in the command line, ConsisID Sampler and the native graph. "
        "(KSampler's own seed draws ComfyUI's noise instead.)"
    )
    CATEGORY = "ConsisID"
    FUNCTION = "get_noise"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's noise input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise_seed": seed_input(control_after_generate=True),
            }
        }

    def get_noise(self, noise_seed: int):
        return (comfy_parts.ReferenceNoise(check_seed(noise_seed, "noise_seed")),)


class ConsisIDDPMSampler:
    DISPLAY_NAME = "ConsisID DPM Sampler"
    DESCRIPTION = (
        "The reference's default sampler (ConsisID Sampler's dpm: CogVideoXDPMScheduler) as a SAMPLER for "
        "SamplerCustomAdvanced: core's DPM-Solver++(2M) SDE given the noise the reference adds at each step for the "
        "seed. With ConsisID Noise at the same seed and the simple scheduler, it gives the reference's video."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's sampler input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise_seed": seed_input("The seed of ConsisID Noise: the step noise continues its generator."),
            }
        }

    def get_sampler(self, noise_seed: int):
        comfy_parts.require("native_dpm", self.DISPLAY_NAME)
        return (comfy_parts.reference_dpm_sampler(check_seed(noise_seed, "noise_seed")),)


class ConsisIDNativeLoRA:
    DISPLAY_NAME = "ConsisID Native LoRA"
    DESCRIPTION = (
        "Adds a LoRA in diffusers/PEFT layout (what ConsisID and CogVideoX trainers write) to a native ConsisID MODEL "
        "at a strength. Core LoraLoaderModelOnly maps no diffusers names for CogVideoX; this node makes the same weight "
        "patches it would make of the exported file, so it stacks with core LoRA loaders. Face-module layers are "
        "left out (use ConsisID LoRA on the wrapper path for those)."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA's patches; the input MODEL is unchanged.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A native ConsisID MODEL (or CogVideoX from Load Diffusion Model)."}),
                "lora_name": (folders.files("loras"), {"tooltip": "A LoRA .safetensors in models/loras, diffusers layout."}),
                "strength_model": lora_strength_input("Scale of the LoRA's update, as ConsisID LoRA's strength "
                                                      "(1 as trained)."),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str):
        return declared_error(cls, lora_name=lora_name) or True

    def apply(self, model, lora_name: str, strength_model: float):
        comfy_parts.require("native_lora", self.DISPLAY_NAME)
        strength = check_strength(strength_model)
        lora = native.comfy_named(read_lora(_model_file("loras", lora_name)))
        return (comfy_parts.with_lora(model, lora, strength),)


class ConsisIDNativeVAEDecode:
    DISPLAY_NAME = "ConsisID Native VAE Decode"
    DESCRIPTION = (
        "Decodes a native CogVideoX LATENT with core's VAE (Load VAE) in the reference's order, two latent frames at a "
        "time: the frames of ConsisID VAE Decode and diffusers. Core VAE Decode runs the same VAE in its own order "
        "(group norms over other frames), so its frames differ a little from the reference's."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = (FRAMES_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "From KSampler or SamplerCustomAdvanced on a native ConsisID MODEL."}),
                "vae": ("VAE", {"tooltip": "The CogVideoX VAE (Load VAE: the checkpoint's vae file)."}),
            }
        }

    def decode(self, samples, vae):
        comfy_parts.require("native_vae", self.DISPLAY_NAME)
        latent = samples.get("samples") if isinstance(samples, dict) else samples
        return (comfy_parts.decode_in_reference_order(vae, latent),)


class ConsisIDDynamicCFG:
    DISPLAY_NAME = "ConsisID Dynamic CFG"
    DESCRIPTION = (
        "The reference's dynamic CFG as a model patch: the guidance scale follows CogVideoX's cosine schedule over "
        "the steps (use_dynamic_cfg in diffusers). Put it on the MODEL before the sampler."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with dynamic CFG for the runs that use it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "A native ConsisID MODEL."})}}

    def patch(self, model):
        comfy_parts.require("native_dynamic_cfg", self.DISPLAY_NAME)
        return (comfy_parts.with_dynamic_cfg(model),)


NODES = {
    "ConsisIDNativeModelLoader": ConsisIDNativeModelLoader,
    "ConsisIDFaceModules": ConsisIDFaceModules,
    "ConsisIDTextConditioning": ConsisIDTextConditioning,
    "ConsisIDIdentityConditioning": ConsisIDIdentityConditioning,
    "ConsisIDNoise": ConsisIDNoise,
    "ConsisIDDPMSampler": ConsisIDDPMSampler,
    "ConsisIDDynamicCFG": ConsisIDDynamicCFG,
    "ConsisIDNativeLoRA": ConsisIDNativeLoRA,
    "ConsisIDNativeVAEDecode": ConsisIDNativeVAEDecode,
}
