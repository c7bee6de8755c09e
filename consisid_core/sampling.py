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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from . import diffusers_hooks as hooks
from .checkpoint import Checkpoint, ConsisIDModel
from .checks import check_latent, check_number, check_seed, check_steps, check_tensors, check_video_size, latent_frames
from .decoder import Tiling, spatial_scale, vae_options
from .errors import ConsisIDError
from .identity import Identity
from .lora import merged
from .memory import (
    available_memory,
    check_fits,
    decode_memory,
    dtype_bytes,
    gigabytes,
    module_bytes,
    placed,
    sampling_memory,
    text_encoder_memory,
)
from .parallel import Parallel, check_parallel, split_over_ranks
from .performance import Performance, StepCacheStats, applied as performance_applied, check_options
from .text import TextEmbeddings, encode_with_checkpoint

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
    allow_oversize: bool = False,
) -> tuple[int, int, int]:
    """(frames, height, width), defaults from the checkpoint, checked against what it can take
    and against the bounds of `checks.bounded_size` (lifted by `allow_oversize`).

    Needs only the configs, so a request fails before any weights load.
    """
    native_frames, native_height, native_width = native_size(transformer_config, vae_config)
    frames = native_frames if frames is None else frames
    height = native_height if height is None else height
    width = native_width if width is None else width
    multiple = spatial_scale(vae_config) * transformer_config["patch_size"]
    t = vae_config["temporal_compression_ratio"]
    least = 2 * t + 1 if transformer_config.get("is_kps", False) else 1
    return check_video_size(frames, height, width, (native_frames, native_height, native_width), multiple, t, least,
                            allow_oversize)


def native_size(transformer_config: Mapping, vae_config: Mapping) -> tuple[int, int, int]:
    """(frames, height, width) the checkpoint was made for: (49, 480, 720) for the real one."""
    scale = spatial_scale(vae_config)
    c = transformer_config
    return c["sample_frames"], c["sample_height"] * scale, c["sample_width"] * scale


MAX_GUIDANCE = 100.0
MAX_IDENTITY_STRENGTH = 10.0


def check_inputs(
    model: ConsisIDModel,
    identity: Identity,
    text: TextEmbeddings | None,
    steps: int,
    seed: int = 0,
    guidance_scale: float = 6.0,
    identity_strength: float | None = None,
) -> None:
    """Every argument of a run that the inputs alone decide, before any work."""
    check_steps(steps, model.scheduler_config.get("num_train_timesteps", 1000))
    check_seed(seed)
    check_number("guidance", guidance_scale, 0, MAX_GUIDANCE, "the reference uses 6; 1 or less turns guidance off")
    if identity_strength is not None:
        check_number("identity strength", identity_strength, 0, MAX_IDENTITY_STRENGTH, "1 is the trained strength")
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


def _pipeline(vae: torch.nn.Module, transformer: torch.nn.Module | None = None, scheduler=None, progress_bar=False):
    from diffusers import ConsisIDPipeline

    pipe = ConsisIDPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


@dataclass(frozen=True)
class RunOptions:
    """How one run goes, besides its model, identity, text and first frame: the one options object
    of `sample`, `generate` and `segments.generate_segments` (which also take its fields as keywords).

    Seed N draws the same noise as `ConsisIDPipeline` given `torch.Generator("cpu").manual_seed(N)`.
    `frames`, `height`, `width` default to the checkpoint's; sizes beyond `checks.bounded_size` need
    `allow_oversize`. `identity_strength` overrides the transformer's `local_face_scale` and
    `performance` (compile, offload, step cache; None: the defaults) applies, both for the run only.
    The models are moved to `device` for the run and back after it, unless `move_models` is off
    (ComfyUI's model management has placed them, perhaps partly). `parallel` splits the run over the
    processes torchrun started (`consisid_core.parallel`; the process group is joined if the caller
    has not); every rank returns the same latents. The model's LoRAs are merged into the
    transformer's weights for the run and taken out after it, unless `merge_loras` is off
    (ComfyUI's ModelPatcher has patched them in). `tiling` and `slicing` are the decode's.
    """

    seed: int = 42
    steps: int = 50
    guidance_scale: float = 6.0
    dynamic_cfg: bool = False
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str = "dpm"
    identity_strength: float | None = None
    device: torch.device | str | None = None
    progress_bar: bool = False
    performance: Performance | None = None
    allow_oversize: bool = False
    move_models: bool = True
    parallel: Parallel | None = None
    merge_loras: bool = True
    tiling: Tiling | None = None
    slicing: bool = False

    def __post_init__(self) -> None:
        if self.performance is None:
            object.__setattr__(self, "performance", Performance())

    @classmethod
    def of(cls, options: RunOptions | None, changes: Mapping) -> RunOptions:
        """`options` (default: the defaults) with the fields in `changes` replaced."""
        return replace(options or cls(), **changes)


@torch.no_grad()
def sample(
    model: ConsisIDModel,
    identity: Identity,
    text: TextEmbeddings,
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    options: RunOptions | None = None,
    *,
    callback: StepCallback | None = None,
    step_cache_stats: StepCacheStats | None = None,
    **changes,
) -> torch.Tensor:
    """Denoise a video as `options` say (`RunOptions`; its fields may also be given as keywords);
    returns latents [1, latent_frames, channels, h, w] on the CPU. Everything is checked before any
    work, and a run that cannot fit the device is refused. What the step cache did (transformer
    forwards computed and skipped) is counted into `step_cache_stats` if given.
    """
    options = RunOptions.of(options, changes)
    size = _checked_size(model, options)
    check_inputs(model, identity, text, options.steps, options.seed, options.guidance_scale, options.identity_strength)
    frame = first_frame(image, identity)
    _check_resources(model, text, size, options)
    pipe = _pipeline(model.vae, model.transformer, make_scheduler(model, options.scheduler), options.progress_bar)
    with _applied(model, options, step_cache_stats):
        latents = _denoise(pipe, model, identity, text, frame, size, options, callback)
    fix = ("its numbers overflowed (fp16 does with this model): load it as bf16 or fp32" if model.dtype == torch.float16
           else "its numbers overflowed: check the model's weights and the LoRAs applied to it")
    check_tensors([("latents", latents)], "this run", fix)
    return latents.cpu()


def _checked_size(model: ConsisIDModel, options: RunOptions) -> tuple[int, int, int]:
    """The run's (frames, height, width), checked, with a warning for what is not the checkpoint's."""
    frames, height, width = resolve_size(
        model.config, model.vae.config, options.frames, options.height, options.width, options.allow_oversize
    )
    native = native_size(model.config, model.vae.config)
    if (frames, height, width) != native:
        logger.warning(
            "generating %d frames at %dx%d; this checkpoint was made for %d frames at %dx%d",
            frames, width, height, *native,
        )
    t = model.vae.config["temporal_compression_ratio"]
    if latent_frames(frames, t) % 2 == 0:
        logger.warning(
            "%d frames are %d latent frames, an even number: the CogVideoX VAE decodes them to more frames than "
            "asked (as diffusers' pipeline does); %d·k + 1 frames (%d, %d, …) decode to exactly as many",
            frames, latent_frames(frames, t), 2 * t, 2 * t + 1, 4 * t + 1,
        )
    return frames, height, width


def _check_resources(model: ConsisIDModel, text: TextEmbeddings, size: tuple[int, int, int], options: RunOptions):
    """Refuse options this diffusers cannot apply, a split over ranks that cannot work, or a run
    that cannot fit the device."""
    performance = options.performance
    check_options(model.transformer, performance)
    if options.parallel is not None:
        check_parallel(
            options.parallel, model.config, model.vae.config, size, options.guidance_scale, performance,
            options.device, model.dtype, text.positive.shape[1],
        )
    check_sampling_fits(model, *size, options.device, performance.offload == "sequential", options.move_models)


@contextlib.contextmanager
def _applied(model: ConsisIDModel, options: RunOptions, stats: StepCacheStats | None) -> Iterator[None]:
    """What the run changes on the model, for the run only and undone after it whatever happens: the
    identity strength, the LoRAs merged, the performance options, the models on the device, the
    split over ranks."""
    device = options.device
    with (
        hooks.face_scale(model.transformer, options.identity_strength),
        merged(model.transformer, model.loras if options.merge_loras else (), device),
        performance_applied(model, options.performance, options.steps, device, stats) as to_place,
        placed(to_place, device if options.move_models else None),
        split_over_ranks(model.transformer, options.parallel, device, model.dtype),
    ):
        yield


def _denoise(pipe, model: ConsisIDModel, identity: Identity, text: TextEmbeddings, frame: Image.Image,
             size: tuple[int, int, int], options: RunOptions, callback: StepCallback | None) -> torch.Tensor:
    """diffusers' pipeline over our components, latents out."""
    frames, height, width = size
    steps, dtype = options.steps, model.dtype

    def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
        if callback is not None:
            callback(i + 1, steps, tensors["latents"])
        return {}

    device = options.device
    target = torch.device(device) if device is not None else next(model.transformer.parameters()).device
    return pipe(
        image=frame,
        prompt_embeds=text.positive.to(target, dtype),
        negative_prompt_embeds=text.negative.to(target, dtype),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=options.guidance_scale,
        use_dynamic_cfg=options.dynamic_cfg,
        generator=torch.Generator("cpu").manual_seed(options.seed),
        output_type="latent",
        return_dict=False,
        callback_on_step_end=on_step_end,
        id_cond=identity.id_cond,
        id_vit_hidden=list(identity.id_vit_hidden),
        kps_cond=identity.kps.numpy(),
    )[0]


def check_sampling_fits(
    model: ConsisIDModel, frames: int, height: int, width: int, device, streamed: bool = False,
    weights_moved: bool = True,
) -> None:
    """Refuse a run whose estimated memory on `device` is more than the device has: the working
    memory, plus on a GPU the weights moved there (the VAE alone when the transformer streams;
    none when `weights_moved` is off: ComfyUI loads what fits and streams the rest)."""
    if device is None:
        return
    device = torch.device(device)
    need = sampling_memory(model.config, model.vae.config, model.dtype, frames, height, width)
    if device.type != "cpu" and weights_moved:  # on the CPU the weights already count as used
        need += module_bytes(model.vae) + (0 if streamed else module_bytes(model.transformer))
    check_fits(
        need, device, f"sampling {frames} frames of {width}×{height}",
        "lower the frame count or the size" + ("" if streamed or device.type == "cpu" else ", or stream the transformer "
                                               "(sequential offload)"),
    )


@torch.no_grad()
def decode(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    device: torch.device | str | None = None,
    tiling: Tiling | None = None,
    slicing: bool = False,
    move_models: bool = True,
) -> torch.Tensor:
    """Latents [B, F, C, h, w] from `sample` -> frames [B·F', H, W, 3], float32 in 0..1, on the CPU.

    Takes the model's VAE alone, so a caller can release the transformer before decoding.
    `tiling` decodes in spatial tiles, `slicing` one video of a batch at a time; both only for
    this call. Out of memory without tiling, it decodes again in 2×2 tiles (as ComfyUI's own VAE
    Decode falls back to tiles); where the estimate already says whole frames cannot fit, it
    starts with those tiles, and where even they cannot, it refuses before any work. The VAE is
    moved to `device` for the decode and back, unless `move_models` is off (already placed).
    """
    check_latents(vae, latents)
    weights = _weights_moved(vae, device) if move_models and device is not None else 0
    if device is not None and tiling is None:
        tiling = _tiles_if_needed(vae, latents.shape, device, weights)
    if device is not None:
        check_fits(
            decode_memory(vae.config, vae.dtype, latents.shape, tiling) + weights, device,
            f"decoding {latents.shape[1]} latent frames of {latents.shape[-1]}×{latents.shape[-2]}",
            "decode with smaller tiles",
        )
    place = device if move_models else None
    try:
        return _decode(vae, latents, place, tiling, slicing)
    except torch.OutOfMemoryError:
        if tiling is not None:
            raise
        scale = spatial_scale(vae.config)
        tiling = Tiling.halves(latents.shape[-2] * scale, latents.shape[-1] * scale, scale)
        logger.warning(
            "out of memory decoding whole frames; decoding again in %dx%d px tiles (VAE tiling)",
            tiling.tile_width, tiling.tile_height,
        )
    # outside the except block, so that the failed attempt's tensors are freed first
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _decode(vae, latents, place, tiling, slicing)


def check_run_fits(
    checkpoint: Checkpoint, dtype: torch.dtype, frames: int, height: int, width: int, device,
    streamed: bool = False, fp8: bool = False,
) -> None:
    """Before any weights load: refuse a whole run (T5, then sampling, then a decode in tiles if
    need be) whose estimated memory on `device` is more than the device has."""
    device = torch.device(device)
    transformer_config, vae_config = checkpoint.transformer_config, checkpoint.vae_config
    size = dtype_bytes(dtype)
    t5 = text_encoder_memory(checkpoint.parameter_count("text_encoder"), dtype)
    transformer = checkpoint.parameter_count("transformer") * (1 if fp8 else size)
    vae = checkpoint.parameter_count("vae") * size
    scale = spatial_scale(vae_config)
    latent_shape = (1, latent_frames(frames, vae_config["temporal_compression_ratio"]), 1, height // scale, width // scale)
    decoding = decode_memory(vae_config, dtype, latent_shape, Tiling.halves(height, width, scale))
    sampling = sampling_memory(transformer_config, vae_config, dtype, frames, height, width)
    on_device = vae + (0 if streamed and device.type != "cpu" else transformer)
    check_fits(t5, device, "encoding the prompt with the checkpoint's T5", "use a machine with more memory")
    check_fits(
        on_device + max(sampling, decoding), device, f"generating {frames} frames of {width}×{height}",
        "lower the frame count or the size" + ("" if streamed or device.type == "cpu" else ", or use --offload sequential"),
    )


def check_latents(vae: torch.nn.Module, latents) -> None:
    """Latents this VAE can decode: [B, F, C, h, w] with its latent channels, finite."""
    check_latent(latents, vae.config.latent_channels, 2, "decode the LATENT of ConsisID Sampler with the VAE of the same model")


def _weights_moved(vae: torch.nn.Module, device) -> int:
    return 0 if torch.device(device).type == "cpu" else module_bytes(vae)


def _tiles_if_needed(vae: torch.nn.Module, shape: tuple[int, ...], device, weights: int) -> Tiling | None:
    """None when whole frames (and `weights` bytes moved there) fit `device` by the estimate, else 2×2 tiles."""
    have = available_memory(device)
    need = decode_memory(vae.config, vae.dtype, shape) + weights
    if have is None or need <= have:
        return None
    scale = spatial_scale(vae.config)
    tiling = Tiling.halves(shape[-2] * scale, shape[-1] * scale, scale)
    logger.warning(
        "decoding whole frames would need about %s, more than the %s available; decoding in %dx%d px tiles",
        gigabytes(need), gigabytes(have), tiling.tile_width, tiling.tile_height,
    )
    return tiling


def _decode(vae, latents, device, tiling: Tiling | None, slicing: bool) -> torch.Tensor:
    pipe = _pipeline(vae)
    with placed([vae], device), vae_options(vae, tiling, slicing):
        weight = next(vae.parameters())
        video = pipe.decode_latents(latents.to(weight.device, weight.dtype))
        video = pipe.video_processor.postprocess_video(video=video, output_type="pt")
    return video.flatten(0, 1).permute(0, 2, 3, 1).float().cpu()


def generate(
    model: ConsisIDModel,
    identity: Identity,
    prompt: str | TextEmbeddings,
    negative_prompt: str = "",
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    options: RunOptions | None = None,
    *,
    callback: StepCallback | None = None,
    step_cache_stats: StepCacheStats | None = None,
    **changes,
) -> torch.Tensor:
    """`sample` then `decode`: frames [F, H, W, 3] float32 in 0..1. `options` as for `sample`; the
    decode takes its device, tiling, slicing and move_models. A prompt given as text is encoded
    with the checkpoint's own T5, loaded for it and released after."""
    options = RunOptions.of(options, changes)
    resolve_size(model.config, model.vae.config, options.frames, options.height, options.width, options.allow_oversize)
    check_inputs(model, identity, None, options.steps, options.seed, options.guidance_scale, options.identity_strength)
    if isinstance(prompt, str):
        text = encode_with_checkpoint(model.checkpoint, model.dtype, prompt, negative_prompt, options.device)
    else:
        text = prompt
    latents = sample(model, identity, text, image, options, callback=callback, step_cache_stats=step_cache_stats)
    return decode(model.vae, latents, options.device, options.tiling, options.slicing, options.move_models)
