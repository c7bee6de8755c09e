"""The VAE's latent grid (`spatial_scale`) and its tiled decode: `Tiling` and `vae_options`, which
sets diffusers' tiling and slicing for one decode and restores the VAE's own settings after.

The VAE's tiling settings (`TILING_ATTRIBUTES`, `enable_tiling`'s parameters) are checked where
they are used: a VAE that keeps them otherwise gets one line refusing tiling and slicing, never a
decode with other tiles.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .checks import check_number
from .errors import ConsisIDError


def spatial_scale(vae_config: Mapping) -> int:
    """Pixels per latent pixel, each way: 8 for the CogVideoX VAE (2 per down block after the first)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


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
            check_number(f"tile {name}", tile, 1, MAX_TILE, integer=True)
            check_number(f"tile overlap ({name})", overlap, 0, MAX_TILE, integer=True)
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


MAX_TILE = 4096


def _grid_factor(tile: int, overlap: int, scale: int) -> float | None:
    """The overlap factor for which diffusers' tiled decode (latent stride int(tile/scale * (1 - f)),
    crop tile - int(tile * f)) steps exactly tile - overlap pixels, or None where floating point
    rounding leaves no such factor."""
    exact = overlap / tile
    for factor in sorted({exact, *(math.nextafter(exact, d) for d in (0.0, 1.0))}):
        if int(tile // scale * (1 - factor)) * scale == tile - int(tile * factor) == tile - overlap:
            return factor
    return None


TILING_ATTRIBUTES = (
    "use_tiling", "use_slicing", "tile_sample_min_height", "tile_sample_min_width", "tile_latent_min_height",
    "tile_latent_min_width", "tile_overlap_factor_height", "tile_overlap_factor_width",
)
"""The VAE's tiling and slicing settings, which `vae_options` sets for one decode and restores."""
_TILING_PARAMETERS = (
    "tile_sample_min_height", "tile_sample_min_width", "tile_overlap_factor_height", "tile_overlap_factor_width",
)


def tiling_problem(vae: torch.nn.Module) -> str | None:
    """What differs from the tiling settings `vae_options` relies on, or None."""
    missing = [n for n in TILING_ATTRIBUTES if not hasattr(vae, n)]
    try:
        parameters = inspect.signature(vae.enable_tiling).parameters
    except (AttributeError, TypeError, ValueError):
        parameters = {}
    missing += [f"enable_tiling({n}=…)" for n in _TILING_PARAMETERS if n not in parameters]
    return ", ".join(missing) or None


@contextlib.contextmanager
def vae_options(vae: torch.nn.Module, tiling: Tiling | None, slicing: bool) -> Iterator[None]:
    """Turn on tiling (a `Tiling`) and/or slicing for one decode and restore the VAE's
    own settings after. Refused with one line if this diffusers' VAE keeps them otherwise."""
    if tiling is None and not slicing:
        yield
        return
    problem = tiling_problem(vae)
    if problem:
        import diffusers

        raise ConsisIDError(
            f"VAE tiling and slicing are built on the VAE's settings ({problem}), which this diffusers "
            f"({diffusers.__version__}) does not have: decode without them, or install a diffusers version this "
            "pack declares"
        )
    saved = {n: getattr(vae, n) for n in TILING_ATTRIBUTES}
    try:
        if tiling is not None:
            factor_height, factor_width = tiling.factors(spatial_scale(vae.config))
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
