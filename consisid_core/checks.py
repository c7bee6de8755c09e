"""What a run accepts, checked before any work: numbers, seeds, prompts, sizes, configs, tensors.

Every check raises a `ConsisIDError` (or a subclass) whose one-line message names the value and
the fix. The bounds are documented here and in the README's "Security" section:

- frames per pass at most `MAX_FRAMES_FACTOR` × the checkpoint's trained count, and at most
  `MAX_PIXELS_FACTOR` × its trained pixels per frame (each side at most that many times its
  trained side), unless the caller explicitly allows oversize runs;
- steps at most the scheduler's training timesteps (1000 for ConsisID);
- configs read from disk: the numbers diffusers builds the models from, positive integers where
  integers, within `CONFIG_RULES`;
- tensors (identities, text embeddings, weights, latents): finite and below `MAX_MAGNITUDE`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping

import torch

from .errors import CheckpointError, ConsisIDError
from .files import shown

MAX_FRAMES_FACTOR = 8
"""Frames per pass: at most 8 × the checkpoint's trained count (392 for ConsisID's 49)."""
MAX_PIXELS_FACTOR = 4
"""Pixels per frame: at most 4 × the trained 480 × 720; each side at most 4 × its trained side."""
MAX_SEED = 2**64 - 1
MAX_PROMPT_CHARACTERS = 100_000
"""T5 reads the first 226 tokens; longer text only costs tokenizing time."""
MAX_MAGNITUDE = 1e8
"""No trained weight, embedding or latent comes near this; a value beyond it (or NaN / Inf)
turns every frame black, so it is refused where it enters."""


def check_number(
    name: str, value, low: float | None = None, high: float | None = None, fix: str = "", integer: bool = False
) -> int | float:
    """`value` as a finite number in [low, high] (an int if `integer`), else a ConsisIDError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if ok:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int beyond any float
            ok = False
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        span = f" from {_fmt(low)} to {_fmt(high)}" if low is not None and high is not None else (
            f" of at least {_fmt(low)}" if low is not None else (f" of at most {_fmt(high)}" if high is not None else "")
        )
        raise ConsisIDError(f"{name} {_repr(value)} must be {kind}{span}" + (f"; {fix}" if fix else ""))
    return int(value) if integer else float(value)


def _fmt(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _repr(value) -> str:
    """`repr(value)` as a message shows it (`files.shown`): a value read from a file can be a long list."""
    try:
        return shown(repr(value), 80)
    except ValueError:  # an int of more digits than Python converts to text
        return "an int of thousands of digits"


def check_seed(seed, name: str = "seed") -> int:
    return check_number(name, seed, 0, MAX_SEED, "seeds are 0 to 2^64 - 1", integer=True)


def check_prompt(text, name: str = "prompt") -> str:
    """A prompt that T5's tokenizer can take: a str of valid UTF-8 text, of bounded length."""
    if not isinstance(text, str):
        raise ConsisIDError(f"the {name} must be text, found {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConsisIDError(
            f"the {name} is not valid UTF-8 text (character {e.start} is a stray byte): "
            "give it as UTF-8, the text encoding of a modern terminal or editor"
        ) from None
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise ConsisIDError(
            f"the {name} is {len(text):,} characters long; T5 reads only its first 226 tokens, so keep it "
            f"under {MAX_PROMPT_CHARACTERS:,} characters"
        )
    return text


def check_steps(steps, train_timesteps: int = 1000, name: str = "steps") -> int:
    return check_number(
        name, steps, 1, train_timesteps,
        f"the scheduler has {train_timesteps} training timesteps (the reference uses 50)", integer=True,
    )


def latent_frames(frames: int, temporal_compression: int) -> int:
    """Latent frames of a video of `frames` frames: the VAE keeps the first frame and compresses
    the rest `temporal_compression` to one (49 frames -> 13 at ConsisID's 4)."""
    return (frames - 1) // temporal_compression + 1


def decoded_frames(frames: int, temporal_compression: int) -> int:
    """Frames the VAE decodes the latents of `frames` frames to: as many for an odd latent count;
    t per latent frame for an even one (the CogVideoX VAE decodes two latent frames at a time, each
    pair to 2·t frames; only an odd first batch of three keeps the first frame single), as in
    diffusers' pipeline."""
    latent = latent_frames(frames, temporal_compression)
    return frames if latent % 2 else latent * temporal_compression


def check_video_size(
    frames, height, width, trained: tuple[int, int, int], multiple: int, temporal: int, least: int = 1,
    allow_oversize: bool = False, names: tuple[str, str, str] = ("frame count", "height", "width"),
) -> tuple[int, int, int]:
    """(frames, height, width) as whole numbers that a model of `trained` (frames, height, width) size
    takes: sides positive multiples of `multiple`, frames `temporal`·k + 1 and at least `least`,
    within `bounded_size` (lifted by `allow_oversize`). `names` are the inputs as the caller calls them."""
    frames, height, width = (check_number(n, v, integer=True) for n, v in zip(names, (frames, height, width)))
    trained_frames, trained_height, trained_width = trained
    for name, value, trained_side in ((names[1], height, trained_height), (names[2], width, trained_width)):
        if value <= 0 or value % multiple:
            raise ConsisIDError(
                f"{name} {value} does not fit this checkpoint: it must be a positive multiple of {multiple} "
                f"(the checkpoint's trained {name} is {trained_side})"
            )
    if frames < least or (frames - 1) % temporal:
        lower = max(least, (frames - 1) // temporal * temporal + 1)
        raise ConsisIDError(
            f"{names[0]} {frames} does not fit this checkpoint: it must be {temporal}·k + 1 and at least {least} "
            f"(e.g. {lower} or {lower + temporal}; the checkpoint's trained count is {trained_frames})"
        )
    bounded_size(frames, height, width, trained, allow_oversize, names)
    return frames, height, width


def check_percent_range(start, end, names: tuple[str, str] = ("start_percent", "end_percent")) -> tuple[float, float]:
    """A part of a sampling run, as percents of its steps (ComfyUI's start/end percent): 0 to 1, start first."""
    start = check_number(names[0], start, 0, 1, "0 is the first step")
    end = check_number(names[1], end, 0, 1, "1 is the last step")
    if start > end:
        raise ConsisIDError(f"{names[0]} {start:g} is after {names[1]} {end:g}; swap them")
    return start, end


def bounded_size(
    frames: int, height: int, width: int, trained: tuple[int, int, int], allow_oversize: bool = False,
    names: tuple[str, str, str] = ("frame count", "height", "width"),
) -> None:
    """Refuse a pass larger than `MAX_FRAMES_FACTOR` × the trained frames or `MAX_PIXELS_FACTOR` ×
    the trained pixels (and sides), unless `allow_oversize`; `names` as the caller calls the three."""
    trained_frames, trained_height, trained_width = trained
    if allow_oversize:
        return
    hint = "; pass allow_oversize (CLI: --allow-oversize) to go beyond it, memory permitting"
    most_frames = MAX_FRAMES_FACTOR * trained_frames
    if frames > most_frames:
        raise ConsisIDError(
            f"{names[0]} {frames} is over this checkpoint's maximum of {most_frames} per pass "
            f"({MAX_FRAMES_FACTOR} × its trained {trained_frames}){hint}"
        )
    side_factor = MAX_PIXELS_FACTOR
    for name, value, trained_side in ((names[1], height, trained_height), (names[2], width, trained_width)):
        if value > side_factor * trained_side:
            raise ConsisIDError(
                f"{name} {value} is over this checkpoint's maximum of {side_factor * trained_side} "
                f"({side_factor} × its trained {trained_side}){hint}"
            )
    if height * width > MAX_PIXELS_FACTOR * trained_height * trained_width:
        raise ConsisIDError(
            f"{width}×{height} is {height * width:,} pixels per frame, over this checkpoint's maximum of "
            f"{MAX_PIXELS_FACTOR * trained_height * trained_width:,} ({MAX_PIXELS_FACTOR} × its trained "
            f"{trained_width}×{trained_height}){hint}"
        )


def check_tensors(
    named: Iterable[tuple[str, torch.Tensor]], where: str, fix: str, error=ConsisIDError, limit: float = MAX_MAGNITUDE
) -> None:
    """Refuse tensors left on the meta device (missing weights) or holding NaN, Inf or values
    beyond `limit`: one reduction per tensor, no copy."""
    named = list(named)
    missing = [name for name, t in named if t.device.type == "meta"]
    if missing:
        names = ", ".join(shown(n) for n in missing[:3])
        raise error(f"{where} lacks {len(missing)} tensor(s) ({names}): the file is incomplete; {fix}")
    for name, t in named:
        if not t.is_floating_point() or t.numel() == 0 or t.dtype in _UNREDUCIBLE:
            continue
        low, high = (float(v) for v in torch.aminmax(t.detach()))
        if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > limit:
            bad = low if not math.isfinite(low) or -low > limit else high
            raise error(f"{where}: '{shown(name)}' holds {_describe_value(bad)} values: {fix}")


_UNREDUCIBLE = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
"""fp8 storage is made from already checked weights."""


def _describe_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "infinite"
    return f"absurdly large ({value:.3g})"


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], where: str, fix: str) -> None:
    """Refuse weights whose keys or shapes differ from what their config builds: one line naming
    the first few missing, unexpected and misshapen keys."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(shown(k) for k in missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(shown(k) for k in unexpected[:3])})")
    if wrong:
        shapes = ", ".join(f"{shown(k)}: {list(found[k])}, expected {list(expected[k])}" for k in wrong[:3])
        problems.append(f"{len(wrong)} of the wrong shape ({shapes})")
    if problems:
        raise CheckpointError(f"{where} do not match their config: keys {'; '.join(problems)}; {fix}")


# ---------------------------------------------------------------------------------------------
# What nodes are given: images and latents

MAX_IMAGE_CHANNELS = 4
"""IMAGE batches have 3 channels; grey (1), grey and alpha (2) and RGBA (4) are taken as RGB."""
LATENT_CAUSE = (
    "the sampling diverged; most often half-precision (fp16) weights overflow (load the model in bf16 or fp32), "
    "or a model, LoRA or face-layers file holds damaged weights"
)
"""Why a sampler's latents hold NaN or infinite values, as far as the pack can tell."""


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return type(value).__name__


def check_image(image, name: str, fix: str, error=ConsisIDError) -> torch.Tensor:
    """An IMAGE as ComfyUI passes one (a float batch [images, height, width, channels] in 0..1) with at
    least one pixel, 1 to `MAX_IMAGE_CHANNELS` channels and finite values, returned as RGB [N, H, W, 3]
    (grey repeated, alpha dropped); else `error` in one line naming `name` and the `fix`."""
    if (not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.ndim != 4
            or 0 in image.shape or image.shape[-1] > MAX_IMAGE_CHANNELS):
        raise error(
            f"the {name} ({_described(image)}) is not an IMAGE: a float batch [images, height, width, channels] "
            f"with at least one pixel and 1 to {MAX_IMAGE_CHANNELS} channels; {fix}"
        )
    if not torch.isfinite(image).all():
        raise error(f"the {name} holds NaN or infinite pixels; {fix}")
    channels = image.shape[-1]
    if channels >= 3:
        return image[..., :3]
    return image[..., :1].expand(*image.shape[:3], 3)


def check_latent(latent, channels: int, channel_dim: int, fix: str) -> torch.Tensor:
    """A video latent to decode: a float tensor of 5 dimensions, none empty, `channels` at
    `channel_dim` (2: [batch, frames, channels, h, w], 1: ComfyUI's [batch, channels, frames, h, w]),
    finite and below `MAX_MAGNITUDE` (else the likely cause, `LATENT_CAUSE`)."""
    layout = "[batch, frames, channels, h, w]" if channel_dim == 2 else "[batch, channels, frames, h, w]"
    if (not isinstance(latent, torch.Tensor) or not latent.is_floating_point() or latent.ndim != 5
            or 0 in latent.shape or latent.shape[channel_dim] != channels):
        raise ConsisIDError(
            f"this LATENT ({_described(latent)}) is not a video latent {layout} of {channels} channels with a frame "
            f"in it: {fix}"
        )
    check_tensors([("samples", latent)], "the LATENT", LATENT_CAUSE)
    return latent


def check_module_weights(module: torch.nn.Module, where: str) -> None:
    """`check_tensors` over a loaded model's parameters and buffers."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    check_tensors(named, where, "the file is damaged; download or convert it again", CheckpointError)


# ---------------------------------------------------------------------------------------------
# Configs read from disk

_SIDE = (1, 4096)
_WIDTH = (1, 65536)
CONFIG_RULES: dict[str, dict[str, tuple]] = {
    "ConsisIDTransformer3DModel": {
        "num_attention_heads": ("int", 1, 1024),
        "attention_head_dim": ("int", 1, 1024),
        "in_channels": ("int", 1, 4096),
        "out_channels": ("int", 1, 4096),
        "time_embed_dim": ("int", *_WIDTH),
        "text_embed_dim": ("int", *_WIDTH),
        "num_layers": ("int", 1, 512),
        "sample_width": ("int", *_SIDE),
        "sample_height": ("int", *_SIDE),
        "sample_frames": ("int", 1, 1024),
        "patch_size": ("int", 1, 64),
        "temporal_compression_ratio": ("int", 1, 64),
        "max_text_seq_length": ("int", 226, 226),
        "norm_eps": ("float", 0.0, 1.0),
        "spatial_interpolation_scale": ("float", 0.0, 1e4),
        "temporal_interpolation_scale": ("float", 0.0, 1e4),
        "cross_attn_interval": ("int", 1, 512),
        "cross_attn_dim_head": ("int", 1, 4096),
        "cross_attn_num_heads": ("int", 1, 1024),
        "LFE_id_dim": ("int", *_WIDTH),
        "LFE_vit_dim": ("int", *_WIDTH),
        "LFE_depth": ("int", 1, 256),
        "LFE_dim_head": ("int", 1, 4096),
        "LFE_num_heads": ("int", 1, 1024),
        "LFE_num_id_token": ("int", 1, 1024),
        "LFE_num_querie": ("int", 1, 4096),
        "LFE_output_dim": ("int", *_WIDTH),
        "LFE_ff_mult": ("int", 1, 64),
        "LFE_num_scale": ("int", 1, 64),
        "local_face_scale": ("float", 0.0, 100.0),
        "activation_fn": ("choice", "gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu"),
        "timestep_activation_fn": ("choice", "swish", "silu", "mish", "gelu", "relu"),
        "is_train_face": ("bool",),
        "is_kps": ("bool",),
        "use_rotary_positional_embeddings": ("bool",),
        "use_learned_positional_embeddings": ("bool",),
        "attention_bias": ("bool",),
        "norm_elementwise_affine": ("bool",),
    },
    "AutoencoderKLCogVideoX": {
        "in_channels": ("int", 1, 64),
        "out_channels": ("int", 1, 64),
        "block_out_channels": ("ints", 1, 16384, 8),
        "down_block_types": ("strs", 8),
        "up_block_types": ("strs", 8),
        "latent_channels": ("int", 1, 1024),
        "layers_per_block": ("int", 1, 64),
        "norm_num_groups": ("int", 1, 1024),
        "norm_eps": ("float", 0.0, 1.0),
        "temporal_compression_ratio": ("int", 1, 64),
        "sample_height": ("int", *_SIDE),
        "sample_width": ("int", *_SIDE),
        "scaling_factor": ("float", 1e-6, 1e6),
    },
    "CogVideoXDPMScheduler": {
        "num_train_timesteps": ("int", 1, 100_000),
        "beta_start": ("float", 0.0, 1.0),
        "beta_end": ("float", 0.0, 1.0),
        "steps_offset": ("int", 0, 100_000),
        "snr_shift_scale": ("float", 1e-6, 1e6),
        "beta_schedule": ("choice", "linear", "scaled_linear", "squaredcos_cap_v2"),
        "trained_betas": ("choice", None),
        "prediction_type": ("choice", "epsilon", "sample", "v_prediction"),
        "timestep_spacing": ("choice", "linspace", "leading", "trailing"),
    },
}
"""Per class, the config values diffusers builds it from, with what they may be: an int or float
in [low, high], a bool, a list of ints / strings of at most n entries, or one of a few choices
(what diffusers would otherwise reject only when it builds the model or samples)."""


def class_defaults(cls) -> dict:
    """A diffusers class's config defaults, from its `__init__` signature."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def check_config(config, class_name: str, where: str, defaults: Mapping | None = None) -> dict:
    """The effective config (`defaults` under the file's values) after checking every value in
    `CONFIG_RULES[class_name]`; a wrong one gets a CheckpointError naming the key and the fix."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"'{where}' must hold a JSON object of settings, found {type(config).__name__}")
    effective = {**(defaults or {}), **config}
    for key, rule in CONFIG_RULES[class_name].items():
        if key not in effective:
            raise CheckpointError(f"'{where}' has no '{key}': add it (the released checkpoint's config.json has it)")
        _check_config_value(effective[key], rule, key, where)
    return effective


def check_face_rules(config: Mapping, where: str) -> None:
    """What the face layers need of a transformer config's numbers beyond their bounds (diffusers
    would fail on these only when it builds or samples)."""
    fix = "use the checkpoint's original config.json"
    for whole, part in (("LFE_depth", "LFE_num_scale"), ("num_layers", "cross_attn_interval")):
        if config[whole] % config[part]:
            raise CheckpointError(f"'{where}': {whole} {config[whole]} is not a multiple of {part} {config[part]}; {fix}")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if config["LFE_output_dim"] != int(inner / 3 * 2):
        raise CheckpointError(
            f"'{where}': LFE_output_dim {config['LFE_output_dim']} must be two thirds of the transformer's width "
            f"{inner} ({int(inner / 3 * 2)}), which the face cross-attention takes; {fix}"
        )


def _check_config_value(value, rule: tuple, key: str, where: str) -> None:
    kind = rule[0]
    fix = "the config is damaged or for another model; use the checkpoint's original config.json"
    if kind == "bool":
        if not isinstance(value, bool):
            raise CheckpointError(f"'{where}': '{key}' is {_repr(value)}, expected true or false; {fix}")
        return
    if kind == "choice":
        if not any(value == choice and type(value) is type(choice) for choice in rule[1:]):
            choices = ", ".join("null" if c is None else repr(c) for c in rule[1:])
            raise CheckpointError(f"'{where}': '{key}' is {_repr(value)}, expected one of {choices}; {fix}")
        return
    if kind in ("ints", "strs"):
        items_ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= rule[-1]
        if items_ok and kind == "ints":
            items_ok = all(
                isinstance(v, int) and not isinstance(v, bool) and rule[1] <= v <= rule[2] for v in value
            )
        elif items_ok:
            items_ok = all(isinstance(v, str) for v in value)
        if not items_ok:
            what = f"whole numbers from {rule[1]} to {rule[2]}" if kind == "ints" else "names"
            raise CheckpointError(
                f"'{where}': '{key}' is {_repr(value)}, expected a list of 1 to {rule[-1]} {what}; {fix}"
            )
        return
    try:
        if kind == "int" and isinstance(value, float):  # diffusers would build layers of a float size
            raise ConsisIDError(f"'{key}' {_repr(value)} must be a whole number written without a decimal point")
        check_number(f"'{key}'", value, rule[1], rule[2], integer=kind == "int")
    except ConsisIDError as e:
        raise CheckpointError(f"'{where}': {e}; {fix}") from None
