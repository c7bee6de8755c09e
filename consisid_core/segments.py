"""Long videos: segments chained on their last frame (`generate_segments`, `run_segments`), each
decoded and handed on as soon as it is sampled; their seeds (`segment_seed`) and colour matching
(`ColourReference`). How the segments chain: docs/long-videos.md and docs/dev/architecture.md,
"Long videos".
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checkpoint import ConsisIDModel
from .checks import MAX_SEED, check_number
from .errors import ConsisIDError
from .identity import Identity
from .media import to_uint8
from .sampling import Run, RunOptions, decode, prepare_run
from .text import TextEmbeddings

logger = logging.getLogger(__name__)

MAX_SEGMENTS = 32
"""Segments per run: at most 32 (1,537 frames, 3 min 12 s at 8 fps, for 49-frame segments).
Memory does not grow with the count; time does, one whole pass per segment."""

SegmentCallback = Callable[[int, int, int, "torch.Tensor | None"], None]
"""Called with (segment, steps done, total steps, latents): with 0 steps done and no latents as
each segment starts, then after each step; raise to stop the run."""


def segment_seed(seed: int, segment: int) -> int:
    """The seed of segment `segment` (counted from 1) of a run with `seed`: (seed + segment − 1) mod 2⁶⁴."""
    return (seed + segment - 1) % (MAX_SEED + 1)


def check_segments(count, frames: int | None = None) -> int:
    """A segment count from 1 to `MAX_SEGMENTS`; more than one needs segments of more than one frame."""
    count = check_number(
        "segment count", count, 1, MAX_SEGMENTS, integer=True,
        fix=f"memory stays that of one segment, but each segment is a whole run; {MAX_SEGMENTS} is the most",
    )
    if count > 1 and frames is not None and frames < 2:
        raise ConsisIDError(
            f"segments of {frames} frame add nothing to the one before (their one frame is its last): "
            "give each segment 5 frames or more"
        )
    return count


def segment_prompts(prompts: Sequence, count: int) -> list:
    """One prompt (or text) for each of `count` segments: one given for all, or one per segment."""
    count = check_segments(count)
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise ConsisIDError(
            f"{len(prompts)} prompts for {count} segments: give one prompt for the whole video, or exactly one "
            "per segment"
        )
    return prompts


@dataclass(frozen=True)
class ColourReference:
    """A video's colour: the per-channel mean and standard deviation of all its pixels in CIELAB
    (OpenCV's float scale: L 0…100, a and b about −127…127)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, frames: torch.Tensor) -> ColourReference:
        """The colour of frames [F, H, W, 3] in 0..1 (for a long video: segment 1's)."""
        return cls._of_lab(_lab(frames))

    @classmethod
    def _of_lab(cls, lab: np.ndarray) -> ColourReference:
        pixels = lab.reshape(-1, 3)
        return cls(pixels.mean(0, dtype=np.float64), pixels.std(0, dtype=np.float64))

    def match(self, frames: torch.Tensor) -> torch.Tensor:
        """`frames` [F, H, W, 3] with this colour: one affine map per channel for the whole segment
        (so its own motion and light changes stay), mean and standard deviation moved to these.
        A channel with no spread (a flat picture) is only shifted."""
        lab = _lab(frames)
        own = ColourReference._of_lab(lab)
        flat = own.std < 1e-3
        scale = np.where(flat, 1.0, self.std / np.where(flat, 1.0, own.std))
        lab -= own.mean.astype(np.float32)  # in place: one float32 copy of the segment at a time
        lab *= scale.astype(np.float32)
        lab += self.mean.astype(np.float32)
        rgb = _rgb(lab.reshape(-1, lab.shape[-2], 3)).reshape(lab.shape)
        return torch.from_numpy(rgb).clamp_(0, 1)


def _lab(frames: torch.Tensor) -> np.ndarray:
    import cv2

    pixels = frames.detach().float().clamp(0, 1).cpu().numpy()
    return cv2.cvtColor(pixels.reshape(-1, pixels.shape[-2], 3), cv2.COLOR_RGB2LAB).reshape(pixels.shape)


def _rgb(lab: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def generate_segments(
    model: ConsisIDModel,
    identity: Identity,
    texts: Sequence[TextEmbeddings],
    image: Image.Image | np.ndarray | torch.Tensor | None = None,
    options: RunOptions | None = None,
    *,
    colour_match: bool = False,
    callback: SegmentCallback | None = None,
    **changes,
) -> Iterator[torch.Tensor]:
    """One segment per text in `texts` (`segment_prompts` makes the list), chained on their last
    frames: `run_segments` of the run `sampling.prepare_run` prepares. `image` is segment 1's first
    frame (default: the identity's aligned face). `options` are `sample`'s (`sampling.RunOptions`,
    or its fields as keywords: steps, cfg, length, device, performance, tiling, …) and
    apply to every segment, its seed to segment 1.
    """
    segments = run_segments(prepare_run(model, identity, None, image, options, **changes), texts,
                            colour_match=colour_match, callback=callback)
    model = None  # the run holds the model: run_segments lets go of it before the last decode
    yield from segments


def run_segments(
    run: Run, texts: Sequence[TextEmbeddings], *, colour_match: bool = False, callback: SegmentCallback | None = None,
) -> Iterator[torch.Tensor]:
    """One segment of `run` (prepared, with its model and identity) per text in `texts`; yields
    each segment's new frames [F', H, W, 3] float32 in 0..1 on the CPU as soon as it is decoded:
    segment 1 whole, every later one without its first frame (the previous one's last).

    Before the last segment's decode the generator lets go of `run` and its model, so that a
    caller holding no other reference to it (the command line) frees the transformer before the
    decode's peak, as a one-pass run does. (No `torch.no_grad` decorator here: its generator
    wrapper would keep the arguments; `sample` and `decode` run without gradients themselves.)
    """
    options = run.options
    count = check_segments(len(texts), options.length)
    for text in texts:
        run.check_text(text)
    reference = first = None
    vae = run.model.vae
    for segment, text in enumerate(texts, 1):
        if callback is not None:
            callback(segment, 0, options.steps, None)  # a Cancel point between segments too
        step = None if callback is None else (lambda done, total, latents, k=segment: callback(k, done, total, latents))
        if segment > 1:
            run = run.continued(segment_seed(options.seed, segment), first)
        latents = run.sample(text, callback=step)
        if segment == count:
            run = None  # the transformer is done: released (if the caller holds it no more) before the decode
            gc.collect()
        video = decode(vae, latents, options.device, options.tiling, options.slicing, options.move_models)
        del latents
        if colour_match:
            if reference is None:
                reference = ColourReference.of(video)
            else:
                video = reference.match(video)
        first = to_uint8(video[-1])
        yield video if segment == 1 else video[1:]
        del video  # what the caller holds is all there is of this segment's frames now
