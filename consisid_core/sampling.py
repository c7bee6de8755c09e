"""Generation: identity + first frame + text -> video latents -> frames.

Sampling runs diffusers' own `ConsisIDPipeline` over our loaded components (latents out), so the
denoising loop, the seeds and the guidance are the reference's by construction. What this module
adds: checks that fail before any work, a fresh scheduler per run, a per-step callback that can
stop the run, options that never stick to the (cached) model, and models put back where they were
whatever happens.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checkpoint import Checkpoint, ConsisIDModel
from .errors import ConsisIDError
from .identity import Identity
from .performance import Performance, applied
from .text import MAX_SEQUENCE_LENGTH, TextEmbeddings, encode_text

logger = logging.getLogger(__name__)

SCHEDULERS = ("dpm", "ddim")
"""`dpm`: CogVideoXDPMScheduler, as the reference. `ddim`: CogVideoXDDIMScheduler."""

StepCallback = Callable[[int, int, torch.Tensor], None]
"""Called after each step with (steps done, total steps, latents); raise to stop the run."""


def resolve_size(
    transformer_config: Mapping,
    vae_config: Mapping,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[int, int, int]:
    """(frames, height, width), defaults from the checkpoint, checked against what it can take.

    Needs only the configs, so a request fails before any weights load.
    """
    native_frames, native_height, native_width = native_size(transformer_config, vae_config)
    frames = native_frames if frames is None else frames
    height = native_height if height is None else height
    width = native_width if width is None else width
    multiple = 2 ** (len(vae_config["block_out_channels"]) - 1) * transformer_config["patch_size"]
    for name, value, native in (("height", height, native_height), ("width", width, native_width)):
        if value <= 0 or value % multiple:
            raise ConsisIDError(
                f"{name} {value} does not fit this checkpoint: it must be a positive multiple of {multiple} "
                f"(the checkpoint's native {name} is {native})"
            )
    t = vae_config["temporal_compression_ratio"]
    least = 2 * t + 1 if transformer_config.get("is_kps", False) else 1
    if frames < least or (frames - 1) % t:
        lower = max(least, (frames - 1) // t * t + 1)
        raise ConsisIDError(
            f"frame count {frames} does not fit this checkpoint: it must be {t}·k + 1 and at least {least} "
            f"(e.g. {lower} or {lower + t}; the checkpoint's native count is {native_frames})"
        )
    return frames, height, width


def native_size(transformer_config: Mapping, vae_config: Mapping) -> tuple[int, int, int]:
    """(frames, height, width) the checkpoint was made for: (49, 480, 720) for the real one."""
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    c = transformer_config
    return c["sample_frames"], c["sample_height"] * scale, c["sample_width"] * scale


def check_inputs(model: ConsisIDModel, identity: Identity, text: TextEmbeddings | None, steps: int) -> None:
    if steps < 1:
        raise ConsisIDError(f"steps {steps} must be at least 1 (the reference uses 50)")
    identity.check_compatible(model.config)
    if text is not None and text.positive.shape[-1] != model.config.text_embed_dim:
        raise ConsisIDError(
            f"the text embeddings are {text.positive.shape[-1]} wide, this transformer takes "
            f"{model.config.text_embed_dim}: encode the prompt with the T5 that goes with this checkpoint"
        )


def first_frame(image: Image.Image | np.ndarray | torch.Tensor | None, identity: Identity) -> Image.Image:
    """The conditioning frame as RGB PIL: `image` (uint8 [H,W,3] or PIL), else the identity's face."""
    if image is None:
        return identity.face_image_pil()
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ConsisIDError(f"the first frame must be uint8 [H, W, 3], found {array.dtype} {list(array.shape)}")
    return Image.fromarray(array)


def make_scheduler(model: ConsisIDModel, name: str):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"dpm": CogVideoXDPMScheduler, "ddim": CogVideoXDDIMScheduler}
    if name not in classes:
        raise ConsisIDError(f"scheduler '{name}' is not one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(dict(model.scheduler_config))


@contextlib.contextmanager
def placed(modules: list[torch.nn.Module], device: torch.device | str | None) -> Iterator[None]:
    """Move `modules` to `device` for the block and back to where they were, whatever happens."""
    if device is None:
        yield
        return
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@contextlib.contextmanager
def _face_scale(transformer: torch.nn.Module, scale: float | None) -> Iterator[None]:
    """Override the transformer's `local_face_scale` (identity strength) for one run."""
    if scale is None:
        yield
        return
    saved = transformer.local_face_scale
    transformer.local_face_scale = scale
    try:
        yield
    finally:
        transformer.local_face_scale = saved


def _pipeline(vae: torch.nn.Module, transformer: torch.nn.Module | None = None, scheduler=None, progress_bar=False):
    from diffusers import ConsisIDPipeline

    pipe = ConsisIDPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


@torch.no_grad()
def sample(
    model: ConsisIDModel,
    identity: Identity,
    text: TextEmbeddings,
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    *,
    seed: int = 42,
    steps: int = 50,
    guidance_scale: float = 6.0,
    dynamic_cfg: bool = False,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: str = "dpm",
    identity_strength: float | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
    performance: Performance | None = None,
) -> torch.Tensor:
    """Denoise a video; returns latents [1, latent_frames, channels, h, w] on the CPU.

    Seed N draws the same noise as `ConsisIDPipeline` given `torch.Generator("cpu").manual_seed(N)`.
    `identity_strength` overrides the transformer's `local_face_scale` for this run only;
    `performance` (compile, offload, step cache) applies to this run only too.
    """
    frames, height, width = resolve_size(model.config, model.vae.config, frames, height, width)
    if (frames, height, width) != native_size(model.config, model.vae.config):
        logger.warning(
            "generating %d frames at %dx%d; this checkpoint was made for %d frames at %dx%d",
            frames, width, height, *native_size(model.config, model.vae.config),
        )
    check_inputs(model, identity, text, steps)
    frame = first_frame(image, identity)
    pipe = _pipeline(model.vae, model.transformer, make_scheduler(model, scheduler), progress_bar)

    def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
        if callback is not None:
            callback(i + 1, steps, tensors["latents"])
        return {}

    dtype = model.dtype
    with (
        applied(model, performance or Performance(), steps, device) as (to_place, _),
        placed(to_place, device),
        _face_scale(model.transformer, identity_strength),
    ):
        target = torch.device(device) if device is not None else next(model.transformer.parameters()).device
        latents = pipe(
            image=frame,
            prompt_embeds=text.positive.to(target, dtype),
            negative_prompt_embeds=text.negative.to(target, dtype),
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=dynamic_cfg,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            return_dict=False,
            callback_on_step_end=on_step_end,
            id_cond=identity.id_cond,
            id_vit_hidden=list(identity.id_vit_hidden),
            kps_cond=identity.kps.numpy(),
        )[0]
    return latents.cpu()


@dataclass(frozen=True)
class Tiling:
    """Decode in overlapping spatial tiles (pixels): less memory at large sizes, seams blended.

    The defaults are diffusers' for CogVideoX at 480x720: 240x360 tiles overlapping 40 and 72 px.
    """

    tile_height: int = 240
    tile_width: int = 360
    overlap_height: int = 40
    overlap_width: int = 72

    @classmethod
    def halves(cls, height: int, width: int, scale: int = 8) -> Tiling:
        """Tiles a little over half the frame each way (2×2 tiles for a frame of height × width px),
        overlapping by the nearest amount that diffusers' tiled decode steps exactly."""

        def tile(size: int) -> tuple[int, int]:
            wanted = scale if size <= 16 * scale else 2 * scale * (size // 240 + 1)
            length = ((size + wanted) // 2 + scale - 1) // scale * scale
            fits = [o for o in range(0, length, scale) if _grid_factor(length, o, scale) is not None]
            return length, min(fits, key=lambda o: abs(o - wanted))

        (tile_height, overlap_height), (tile_width, overlap_width) = tile(height), tile(width)
        return cls(tile_height, tile_width, overlap_height, overlap_width)

    def factors(self, scale: int) -> tuple[float, float]:
        """Overlap factors for diffusers, checked to land on the VAE's latent grid."""
        result = []
        for name, tile, overlap in (
            ("height", self.tile_height, self.overlap_height),
            ("width", self.tile_width, self.overlap_width),
        ):
            if tile < 2 * scale or tile % scale or overlap < 0 or overlap >= tile or (tile - overlap) % scale:
                raise ConsisIDError(
                    f"tile {name} {tile} px with {overlap} px overlap does not fit the VAE's {scale}-px latent "
                    f"grid: the tile must be a multiple of {scale}, the overlap smaller than the tile, and "
                    f"tile - overlap a multiple of {scale} (e.g. tile 240, overlap 40)"
                )
            factor = _grid_factor(tile, overlap, scale)
            if factor is None:
                fits = [o for o in range(0, tile, scale) if _grid_factor(tile, o, scale) is not None]
                nearest = sorted(fits, key=lambda o: abs(o - overlap))[:3]
                raise ConsisIDError(
                    f"tile {name} {tile} px with {overlap} px overlap cannot be decoded exactly by diffusers' "
                    f"tiling (rounding); overlaps that work with this tile: {', '.join(map(str, sorted(nearest)))}"
                )
            result.append(factor)
        return result[0], result[1]


def _grid_factor(tile: int, overlap: int, scale: int) -> float | None:
    """The overlap factor for which diffusers' tiled decode (latent stride int(tile/scale * (1 - f)),
    crop tile - int(tile * f)) steps exactly tile - overlap pixels, or None where floating point
    rounding leaves no such factor."""
    exact = overlap / tile
    for factor in sorted({exact, *(math.nextafter(exact, d) for d in (0.0, 1.0))}):
        if int(tile // scale * (1 - factor)) * scale == tile - int(tile * factor) == tile - overlap:
            return factor
    return None


@contextlib.contextmanager
def vae_options(vae: torch.nn.Module, tiling: Tiling | None, slicing: bool) -> Iterator[None]:
    """Turn on tiling/slicing for one decode and restore the VAE's own settings after."""
    names = (
        "use_tiling", "use_slicing", "tile_sample_min_height", "tile_sample_min_width", "tile_latent_min_height",
        "tile_latent_min_width", "tile_overlap_factor_height", "tile_overlap_factor_width",
    )
    saved = {n: getattr(vae, n) for n in names}
    try:
        if tiling is not None:
            factor_height, factor_width = tiling.factors(_spatial_scale(vae))
            vae.enable_tiling(
                tile_sample_min_height=tiling.tile_height,
                tile_sample_min_width=tiling.tile_width,
                tile_overlap_factor_height=factor_height,
                tile_overlap_factor_width=factor_width,
            )
        vae.use_slicing = slicing or saved["use_slicing"]
        yield
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)


@torch.no_grad()
def decode(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    device: torch.device | str | None = None,
    tiling: Tiling | None = None,
    slicing: bool = False,
) -> torch.Tensor:
    """Latents [B, F, C, h, w] from `sample` -> frames [B·F', H, W, 3], float32 in 0..1, on the CPU.

    Takes the model's VAE alone, so a caller can release the transformer before decoding.
    `tiling` decodes in spatial tiles, `slicing` one video of a batch at a time; both only for
    this call. Out of memory without tiling, it decodes again in 2×2 tiles (as ComfyUI's own VAE
    Decode falls back to tiles).
    """
    try:
        return _decode(vae, latents, device, tiling, slicing)
    except torch.OutOfMemoryError:
        if tiling is not None:
            raise
        scale = _spatial_scale(vae)
        tiling = Tiling.halves(latents.shape[-2] * scale, latents.shape[-1] * scale, scale)
        logger.warning(
            "out of memory decoding whole frames; decoding again in %dx%d px tiles (VAE tiling)",
            tiling.tile_width, tiling.tile_height,
        )
    # outside the except block, so that the failed attempt's tensors are freed first
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _decode(vae, latents, device, tiling, slicing)


DECODE_BYTES_PER_LATENT = 307_000 * 4
"""Peak working memory of a whole-frame decode, per latent voxel of the VAE's first frame batch,
in bytes at fp32, for the released VAE architecture with the decoder our loaders return
(`decoder.speed_up_decoder`): `python -m bench.gpu_memory --size real` counts 9.95 GB of live
tensors for 49 frames at 480×720 in bf16 (3 latent frames of 60×90 at a time; diffusers' own
decoder 15.8 GB), and at the medium size (3 latent frames of 20×30, fp32) this gives 2,108 MiB
against the 2,332 MiB of RSS `python -m bench --size medium` measures."""


def decode_memory(vae: torch.nn.Module, latents_shape: tuple[int, ...], tiling: Tiling | None = None) -> int:
    """Estimated working memory (bytes) of decoding latents [B, F, C, h, w] with this VAE in its
    dtype: the VAE decodes at most 3 latent frames at a time (diffusers' frame batches), one
    video at a time with slicing, and one tile at a time with `tiling`."""
    frames, height, width = min(latents_shape[1], 3), latents_shape[-2], latents_shape[-1]
    if tiling is not None:
        scale = _spatial_scale(vae)
        height, width = min(height, tiling.tile_height // scale), min(width, tiling.tile_width // scale)
    dtype_bytes = next(vae.parameters()).element_size()
    return DECODE_BYTES_PER_LATENT * frames * height * width * dtype_bytes // 4


SAMPLING_ACTIVATIONS_PER_TOKEN = 13
"""Peak activations of one transformer forward, in token-widths (tokens × the transformer's inner
width) per token of the guided batch: `python -m bench.gpu_memory --size real` counts 2.82 GB for
2 × 17,776 tokens of width 3,072 in bf16 (12.9)."""

ENCODE_ACTIVATIONS_PER_PIXEL = 2_700
"""Peak activations of the first frame's VAE encode, in elements per pixel (the same estimate:
1.84 GB for one 480×720 frame in bf16)."""


def sampling_memory(model: ConsisIDModel, frames: int, height: int, width: int) -> int:
    """Estimated working memory (bytes) of `sample` at this size beyond the weights: the larger of
    one transformer forward of the guided batch of 2 and the first frame's VAE encode."""
    config = model.config
    scale = _spatial_scale(model.vae)
    temporal = model.vae.config.temporal_compression_ratio
    patches = (height // scale // config.patch_size) * (width // scale // config.patch_size)
    tokens = 2 * (MAX_SEQUENCE_LENGTH + ((frames - 1) // temporal + 1) * patches)
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    forward = SAMPLING_ACTIVATIONS_PER_TOKEN * tokens * config.num_attention_heads * config.attention_head_dim
    encode = ENCODE_ACTIVATIONS_PER_PIXEL * height * width
    return max(forward, encode) * dtype_bytes


def _spatial_scale(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _decode(vae, latents, device, tiling: Tiling | None, slicing: bool) -> torch.Tensor:
    pipe = _pipeline(vae)
    with placed([vae], device), vae_options(vae, tiling, slicing):
        weight = next(vae.parameters())
        video = pipe.decode_latents(latents.to(weight.device, weight.dtype))
        video = pipe.video_processor.postprocess_video(video=video, output_type="pt")
    return video.flatten(0, 1).permute(0, 2, 3, 1).float().cpu()


def encode_with_checkpoint(
    checkpoint: Checkpoint | None, dtype: torch.dtype, prompt: str, negative_prompt: str = "", device=None
) -> TextEmbeddings:
    """Encode with the checkpoint's own T5, loaded for this and released after."""
    if checkpoint is None:
        raise ConsisIDError(
            "this model was loaded from single files, so it has no T5 text encoder of its own: encode the "
            "prompt with another T5-XXL (in ComfyUI: CLIPLoader with the t5xxl file, type sd3)"
        )
    encoder = checkpoint.load_text_encoder(dtype)
    try:
        return encode_text(encoder, prompt, negative_prompt, device)
    finally:
        del encoder
        gc.collect()


def generate(
    model: ConsisIDModel,
    identity: Identity,
    prompt: str | TextEmbeddings,
    negative_prompt: str = "",
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """`sample` then `decode`: frames [F, H, W, 3] float32 in 0..1. Options as for `sample`."""
    resolve_size(model.config, model.vae.config, options.get("frames"), options.get("height"), options.get("width"))
    check_inputs(model, identity, None, options.get("steps", 50))
    if isinstance(prompt, str):
        text = encode_with_checkpoint(model.checkpoint, model.dtype, prompt, negative_prompt, options.get("device"))
    else:
        text = prompt
    latents = sample(model, identity, text, image, **options)
    return decode(model.vae, latents, options.get("device"))
