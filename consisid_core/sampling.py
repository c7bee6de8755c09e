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
from .text import MAX_SEQUENCE_LENGTH, TextEmbeddings, encode_with_checkpoint
from .tiling import Tiling, spatial_scale, vae_options

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
    trained_frames, trained_height, trained_width = trained_size(transformer_config, vae_config)
    frames = trained_frames if frames is None else frames
    height = trained_height if height is None else height
    width = trained_width if width is None else width
    multiple = spatial_scale(vae_config) * transformer_config["patch_size"]
    t = vae_config["temporal_compression_ratio"]
    least = 2 * t + 1 if transformer_config.get("is_kps", False) else 1
    return check_video_size(frames, height, width, (trained_frames, trained_height, trained_width), multiple, t, least,
                            allow_oversize)


def trained_size(transformer_config: Mapping, vae_config: Mapping) -> tuple[int, int, int]:
    """(frames, height, width) the checkpoint was made for: (49, 480, 720) for the real one."""
    scale = spatial_scale(vae_config)
    c = transformer_config
    return c["sample_frames"], c["sample_height"] * scale, c["sample_width"] * scale


MAX_GUIDANCE = 100.0
MAX_IDENTITY_STRENGTH = 10.0


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
    `length`, `height`, `width` default to the checkpoint's; sizes beyond `checks.bounded_size` need
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
    cfg: float = 6.0
    dynamic_cfg: bool = False
    length: int | None = None
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


@dataclass(frozen=True)
class Run:
    """One run, checked once: each check is made when what it needs arrives, and never again.

    `Run.prepare` checks what the options and the model's configs decide (the size, resolved from
    the checkpoint's defaults; steps, seed, guidance, identity strength, scheduler; the split over
    ranks), so a command can refuse before any weights load; `with_identity` checks the identity
    and takes the first frame; `with_model` checks what needs the loaded model (the performance
    options' diffusers internals, the room on the device, unless `check_room` checked the whole
    run's before the load); `check_text` checks a text. `prepare_run` does all of these for a
    loaded model. `sample` then runs with nothing left to check.
    """

    options: RunOptions
    """`length`, `height` and `width` resolved."""
    transformer_config: Mapping
    vae_config: Mapping
    dtype: torch.dtype
    labels: Mapping[str, str]
    """What the messages call the seed, steps, guidance, identity strength and identity (a command's
    option names)."""
    model: ConsisIDModel | None = None
    identity: Identity | None = None
    frame: Image.Image | None = None
    room_checked: bool = False

    @classmethod
    def prepare(
        cls, transformer_config: Mapping, vae_config: Mapping, scheduler_config: Mapping, dtype: torch.dtype,
        options: RunOptions | None = None, *, labels: Mapping[str, str] | None = None, **changes,
    ) -> Run:
        """The checks the options and the configs decide; needs no weights."""
        options = RunOptions.of(options, changes)
        labels = dict(labels or {})
        size = resolve_size(
            transformer_config, vae_config, options.length, options.height, options.width, options.allow_oversize
        )
        check_steps(options.steps, scheduler_config.get("num_train_timesteps", 1000), labels.get("steps", "steps"))
        check_seed(options.seed, labels.get("seed", "seed"))
        check_number(labels.get("cfg", "cfg"), options.cfg, 0, MAX_GUIDANCE,
                     "the reference uses 6; 1 or less turns guidance off")
        if options.identity_strength is not None:
            check_number(labels.get("identity strength", "identity strength"), options.identity_strength, 0,
                         MAX_IDENTITY_STRENGTH, "1 is the trained strength")
        if options.scheduler not in SCHEDULERS:
            raise ConsisIDError(f"scheduler '{options.scheduler}' is not one of {', '.join(SCHEDULERS)}")
        if options.parallel is not None:
            check_parallel(options.parallel, transformer_config, vae_config, size, options.cfg,
                           options.performance, options.device, dtype, MAX_SEQUENCE_LENGTH)
        frames, height, width = size
        sized = replace(options, length=frames, height=height, width=width)
        return cls(sized, transformer_config, vae_config, dtype, labels)

    @property
    def size(self) -> tuple[int, int, int]:
        return self.options.length, self.options.height, self.options.width

    def check_room(self, checkpoint: Checkpoint, fp8: bool = False) -> Run:
        """Before any weights load: the whole run's room on the device (T5, sampling, a decode),
        from `checkpoint`'s parameter counts (`check_run_fits`)."""
        o = self.options
        check_run_fits(checkpoint, self.dtype, *self.size, o.device, o.performance.offload == "sequential", fp8)
        return replace(self, room_checked=True)

    def with_identity(self, identity: Identity, image: Image.Image | np.ndarray | torch.Tensor | None = None) -> Run:
        """The run for `identity`, its first frame `image` (default: the identity's aligned face)."""
        identity.check_compatible(self.transformer_config, self.labels.get("identity", "the identity"))
        return replace(self, identity=identity, frame=first_frame(image, identity))

    def with_model(self, model: ConsisIDModel) -> Run:
        """The run on `model`, loaded from the configs it was prepared with (a size that is not the
        checkpoint's is said here, once the run is sure to start)."""
        o = self.options
        check_options(model.transformer, o.performance)
        if not self.room_checked:
            check_sampling_fits(model, *self.size, o.device, o.performance.offload == "sequential", o.move_models)
        _warn_of_size(self.transformer_config, self.vae_config, self.size)
        return replace(self, model=model, room_checked=True)

    def check_text(self, text: TextEmbeddings) -> TextEmbeddings:
        width = self.transformer_config["text_embed_dim"]
        if text.positive.shape[-1] != width:
            raise ConsisIDError(
                f"the text embeddings are {text.positive.shape[-1]} wide, this transformer takes {width}: "
                "encode the prompt with the T5 that goes with this checkpoint"
            )
        o = self.options
        if o.parallel is not None and text.positive.shape[1] != MAX_SEQUENCE_LENGTH:  # the split was checked for those
            check_parallel(o.parallel, self.transformer_config, self.vae_config, self.size, o.cfg,
                           o.performance, o.device, self.dtype, text.positive.shape[1])
        return text

    def placed(self, device: torch.device | str | None, move_models: bool, merge_loras: bool) -> Run:
        """The run where ComfyUI's model management put the models. The room for sampling, which
        `with_model` checked for the placement expected then, is checked again only where this
        placement is another."""
        o = self.options
        expected = (None if o.device is None else torch.device(o.device), o.move_models)
        if (None if device is None else torch.device(device), move_models) != expected:
            check_sampling_fits(self.model, *self.size, device, o.performance.offload == "sequential", move_models)
        return replace(self, options=replace(o, device=device, move_models=move_models, merge_loras=merge_loras))

    def continued(self, seed: int, frame: np.ndarray | torch.Tensor) -> Run:
        """The run from another seed and first frame, both its own (a long video's next segment:
        the seed wrapped by `segments.segment_seed`, the frame the previous segment decoded)."""
        return replace(self, options=replace(self.options, seed=seed), frame=first_frame(frame, self.identity))

    @torch.no_grad()
    def sample(
        self, text: TextEmbeddings, *, callback: StepCallback | None = None,
        step_cache_stats: StepCacheStats | None = None,
    ) -> torch.Tensor:
        """Latents [1, latent_frames, channels, h, w] on the CPU, for a `text` that `check_text`
        passed. What the step cache did is counted into `step_cache_stats` if given."""
        model, options = self.model, self.options
        if model is None or self.identity is None:
            raise ConsisIDError("this run has no model or no identity yet: give them with with_model and with_identity")
        pipe = _pipeline(model.vae, model.transformer, make_scheduler(model, options.scheduler), options.progress_bar)
        with _applied(model, options, step_cache_stats):
            latents = _denoise(pipe, model, self.identity, text, self.frame, self.size, options, callback)
        fix = ("its numbers overflowed (fp16 does with this model): load it as bf16 or fp32"
               if model.dtype == torch.float16
               else "its numbers overflowed: check the model's weights and the LoRAs applied to it")
        check_tensors([("latents", latents)], "this run", fix)
        return latents.cpu()

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """`decode` with the run's device, tiling, slicing and placement."""
        o = self.options
        return decode(vae, latents, o.device, o.tiling, o.slicing, o.move_models)


def prepare_run(
    model: ConsisIDModel,
    identity: Identity,
    text: TextEmbeddings | None = None,
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    options: RunOptions | None = None,
    **changes,
) -> Run:
    """A run on a loaded model with every check made (`Run`); `text` may come later (`Run.check_text`)."""
    run = Run.prepare(model.config, model.vae.config, model.scheduler_config, model.dtype, options, **changes)
    run = run.with_identity(identity, image)
    if text is not None:
        run.check_text(text)
    return run.with_model(model)


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
    work (`prepare_run`), and a run that cannot fit the device is refused. What the step cache did
    (transformer forwards computed and skipped) is counted into `step_cache_stats` if given.
    """
    run = prepare_run(model, identity, text, image, options, **changes)
    return run.sample(text, callback=callback, step_cache_stats=step_cache_stats)


def _warn_of_size(transformer_config: Mapping, vae_config: Mapping, size: tuple[int, int, int]) -> None:
    """A warning for a size that is not the checkpoint's, and for frames the VAE decodes to more."""
    frames, height, width = size
    trained = trained_size(transformer_config, vae_config)
    if (frames, height, width) != trained:
        logger.warning(
            "generating %d frames at %dx%d; this checkpoint was made for %d frames at %dx%d",
            frames, width, height, *trained,
        )
    t = vae_config["temporal_compression_ratio"]
    if latent_frames(frames, t) % 2 == 0:
        logger.warning(
            "%d frames are %d latent frames, an even number: the CogVideoX VAE decodes them to more frames than "
            "asked (as diffusers' pipeline does); %d·k + 1 frames (%d, %d, …) decode to exactly as many",
            frames, latent_frames(frames, t), 2 * t, 2 * t + 1, 4 * t + 1,
        )


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
        guidance_scale=options.cfg,
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
    given = None if isinstance(prompt, str) else prompt
    run = prepare_run(model, identity, given, image, options, **changes)
    if given is None:
        given = run.check_text(
            encode_with_checkpoint(model.checkpoint, model.dtype, prompt, negative_prompt, run.options.device)
        )
    latents = run.sample(given, callback=callback, step_cache_stats=step_cache_stats)
    return run.decode(model.vae, latents)
