"""What the nodes declare, in one place: the pack's socket types, the inputs wrapper and native
nodes share, the one check of an IMAGE input, and the declared bounds ComfyUI skips.

For every input a node's `VALIDATE_INPUTS` takes, ComfyUI no longer checks the declared minimum,
maximum or list of choices, so `declared_error` does it. ComfyUI shows what `VALIDATE_INPUTS`
returns under every input it takes; the native nodes' `VALIDATE_INPUTS` therefore take one input
each (a file name), and their numbers are checked again, NaN and all, when the node runs
(`consisid_core.checks`), before any work."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..consisid_core.checks import check_image
from ..consisid_core.errors import ConsisIDError
from ..consisid_core.files import shown
from ..consisid_core.lora import MAX_STRENGTH
from ..consisid_core.media import to_uint8
from ..consisid_core.sampling import MAX_IDENTITY_STRENGTH
from . import folders

logger = logging.getLogger(__name__)

# the pack's own socket types
CONSISID_MODEL = "CONSISID_MODEL"
CONSISID_IDENTITY = "CONSISID_IDENTITY"
CONSISID_TEXT = "CONSISID_TEXT"
CONSISID_FACE_MODELS = "CONSISID_FACE_MODELS"
CONSISID_PERFORMANCE = "CONSISID_PERFORMANCE"

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SEED_TOOLTIP = "Same seed, same noise as diffusers with torch.Generator('cpu').manual_seed(seed)."
FRAME_COUNT_TOOLTIP = "Frame count, 4·k + 1; ConsisID was trained on 49."
FIRST_IMAGE_TOOLTIP = "First frame; by default the identity's aligned face, as the reference. A batch uses its first image."
FIRST_FRAME_FIX = "connect a Load Image, or leave the input empty for the identity's face"
IDENTITY_TOOLTIP = "From ConsisID Face Embed or Load Identity."
TEXT_TOOLTIP = "From ConsisID Text Encode."
FRAMES_TOOLTIP = "The frames, [F, H, W, 3] in 0..1 (videos of a batch one after another)."
"""The decoders' output (ConsisID VAE Decode's and ConsisID Native VAE Decode's)."""
SINGLE_FILE = "diffusion_models/"
"""The prefix of a single-file transformer among the checkpoints (`checkpoint_names`)."""


def checkpoint_names() -> list[str]:
    """The model loaders' choices: the checkpoint folders, then `SINGLE_FILE` + each transformer file."""
    return sorted(folders.pipeline_folders()) + [SINGLE_FILE + n for n in folders.files("diffusion_models")]


def checkpoint_source(name: str) -> Path:
    """A choice of `checkpoint_names` as its path (the transformer file, or the checkpoint folder);
    FileNotFoundError in one line for a name not in the list."""
    if name.startswith(SINGLE_FILE):
        return folders.file_path("diffusion_models", name.removeprefix(SINGLE_FILE))
    found = folders.pipeline_folders()
    if name not in found:
        raise FileNotFoundError(f"checkpoint '{shown(name)}' is not in models/consisid or models/diffusers; refresh the list")
    return found[name]


def seed_input(tooltip: str = SEED_TOOLTIP, default: int = 42, **options) -> tuple:
    """A seed: any 64-bit unsigned integer, as ComfyUI's own seeds."""
    return ("INT", {"default": default, "min": 0, "max": MAX_SEED, **options, "tooltip": tooltip})


def width_input() -> tuple:
    return ("INT", {"default": 720, "min": 16, "max": 4096, "step": 16,
                    "tooltip": "Multiple of 16; ConsisID was trained at 720."})


def height_input() -> tuple:
    return ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                    "tooltip": "Multiple of 16; ConsisID was trained at 480."})


def length_input(tooltip: str = FRAME_COUNT_TOOLTIP) -> tuple:
    """A video's frame count `length`, 4·k + 1 (the Sampler's, Identity Conditioning's)."""
    return ("INT", {"default": 49, "min": 1, "max": 1025, "step": 4, "tooltip": tooltip})


def identity_strength_input(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_IDENTITY_STRENGTH, "step": 0.05, "tooltip": tooltip})


def lora_strength_input(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
                      "round": 0.0001,  # 1 / rank for rank 128 is 0.0078
                      "tooltip": tooltip})


def step_cache_input(default: float = 0.0) -> tuple:
    """TeaCache's threshold (ConsisID Performance's step_cache, ConsisID Step Cache's threshold)."""
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01,
                      "tooltip": "TeaCache threshold: skip steps whose timestep embedding changed little. "
                                 "0 off; 0.1 / 0.15 / 0.2 trade quality for about 1.6x / 2.1x / 2.7x."})


def image_batch(value, name: str, source: str, error: type[ConsisIDError] = ConsisIDError) -> torch.Tensor:
    """Every node's check of an IMAGE input (`checks.check_image`): RGB [N, H, W, 3] in 0..1, else
    `error` in one line naming the input (`name`) and what to connect (`source`)."""
    return check_image(value, name, f"connect {source}", error)


def first_image(value, name: str) -> np.ndarray | None:
    """An optional first-frame IMAGE as uint8 [H, W, 3]: its first image (the log says when it is a
    batch), or None when nothing is connected."""
    if value is None:
        return None
    image = check_image(value, name, FIRST_FRAME_FIX)
    if len(image) > 1:
        logger.info("the %s is a batch of %d; using its first image", name, len(image))
    return to_uint8(image[0])


def declared_error(node_class, **values) -> str | None:
    """The first value outside what `node_class.INPUT_TYPES()` declares for it, as one line."""
    types = node_class.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    for name, value in values.items():
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                return f"{name} '{shown(value)}' is not one of the choices; pick one from the list (refresh it after adding files)"
        elif kind in ("INT", "FLOAT"):
            # ints stay ints: a huge one (JSON allows 10**400) would overflow a float
            number = not isinstance(value, bool) and (
                isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
            )
            whole = number and (isinstance(value, int) or value.is_integer())
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if not number or (kind == "INT" and not whole) or not low <= value <= high:
                return f"{name} {shown(value)} must be {'a whole number' if kind == 'INT' else 'a number'} from {low} to {high}"
    return None
