"""The CogVideoX VAE decoder: a faster one with the same results (`speed_up_decoder(vae)`,
checked at load), the VAE's latent grid (`spatial_scale`) and its tiled decode (`Tiling`,
`vae_options`).

This is the one module for the VAE decoder's private internals: nothing else in the pack imports
diffusers' private CogVideoX classes (`CogVideoXCausalConv3d`, `CogVideoXSpatialNorm3D`,
`CogVideoXResnetBlock3D`, `CogVideoXUpsample3D`) or relies on their `conv_cache` behaviour and
padding. The loaders rebuild three kinds of the decoder's modules as the subclasses below (same
parameters, same outputs within float32 rounding) and make its resnets' SiLU work in place:

- `SpatialNorm3D`: diffusers upsamples the latent (nearest) to every feature map's size and runs
  two 1×1×1 convolutions on the result; a 1×1×1 convolution commutes with nearest upsampling, so
  this one runs them at the latent's size and broadcasts their outputs into the normalized map.
  Identical operations per pixel: the same results in every dtype.
- `Upsample3D`: nearest 2× upsampling then a 3×3 convolution is four 2×2 convolutions of the
  un-upsampled frames (one per output pixel phase, with summed taps): 4/9 of the work, and frames
  that diffusers doubles in time are convolved once.
- `CausalConv3d`: in the first frame batch diffusers pads time by repeating the first frame, so
  the first outputs convolve that frame with several temporal taps; those taps are summed into
  one 2D kernel per output frame. It hands on the same `conv_cache` (the last frames) as diffusers.

The last two sum weights, which is exact to float32 rounding but in bf16/fp16 rounds the sums
(measured on the tiny VAE in bf16: each gave 2-3 % more error against an fp32 decode than
diffusers' own half-precision decode), so in half precision they run diffusers' forward.

Checked at every load, so that a diffusers upgrade can never silently change a frame:

1. up front, that each private class still imports from where it did, that the methods called
   or overridden here take exactly the parameters they did, and that the decoder's instances have
   the attributes read here (`_PRIVATE`). A class that does not import leaves a stand-in here
   (importing this module never fails because of it);
2. after rebuilding, `CHECK_LATENT` (a random latent of 5 frames, so two frame batches with the
   temporal caches handed between them, an odd and an even one, at 1×2 latent pixels) is decoded
   with the stock modules and with the rebuilt ones on the VAE's own device and dtype (the
   causal convolutions folding also where the CPU would hand so small an input to diffusers;
   cuDNN's TF32 off): float32 frames must agree within 1e-4 of their largest magnitude,
   bf16/fp16 frames bit for bit.

On any difference, or any exception from the rebuilt path, the stock modules are put back and
one warning names the diffusers version and what differed: the frames are then diffusers' own.

The VAE's tiling and slicing settings (`TILING_ATTRIBUTES`, `enable_tiling`'s parameters) that
`vae_options` sets for one decode are checked where they are used: a VAE that keeps them
otherwise gets one line refusing tiling and slicing, never a decode with other tiles.

What `speed_up_decoder` costs at load, the check's two decodes (17 frames of 8×16 pixels)
included, measured on the 2-core CPU here (best of several): the tiny VAE 0.08 s in fp32 and in
bf16; the real VAE's architecture (random weights) 1.2 s in fp32 and 0.4 s in bf16 on that CPU,
which is where the loaders put it. On a GPU: 41 GFLOP and about 2,000 operator calls per decode,
so an estimated 50 ms (not measured: no GPU was lent). A VAE on the meta device (memory estimates) has no values to compare: it is
rebuilt unchecked.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_number
from .errors import ConsisIDError, first_line

logger = logging.getLogger(__name__)

_AUTOENCODER = "diffusers.models.autoencoders.autoencoder_kl_cogvideox"
_UPSAMPLING = "diffusers.models.upsampling"

# Each private diffusers class used here: the module it lives in, the parameters (after `self`)
# of the methods that this module calls (`__init__`, to rebuild) or overrides (`forward`), and the
# attributes of its instances that this module reads.
_PRIVATE = {
    "CogVideoXCausalConv3d": (
        _AUTOENCODER,
        {
            "__init__": ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "pad_mode"),
            "forward": ("inputs", "conv_cache"),
        },
        ("conv", "time_kernel_size", "pad_mode"),
    ),
    "CogVideoXSpatialNorm3D": (
        _AUTOENCODER,
        {"__init__": ("f_channels", "zq_channels", "groups"), "forward": ("f", "zq", "conv_cache")},
        ("norm_layer", "conv_y.conv", "conv_b.conv"),
    ),
    "CogVideoXUpsample3D": (
        _UPSAMPLING,
        {
            "__init__": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "compress_time"),
            "forward": ("inputs",),
        },
        ("conv", "compress_time"),
    ),
    "CogVideoXResnetBlock3D": (_AUTOENCODER, {}, ("nonlinearity",)),  # its SiLU is swapped, nothing overridden
}

CHECK_LATENT = (5, 1, 2)
"""The load-time check's latent: frames, height, width (any channel count, batch 1)."""

FP32_TOLERANCE = 1e-4
"""The check's bound on max |Δ| for float32 frames, as a fraction of their largest magnitude."""


def _lookup(name: str) -> type | None:
    """diffusers' private class `name` as it imports now, or None."""
    where = _PRIVATE[name][0]
    try:
        found = getattr(importlib.import_module(where), name)
    except Exception:  # moved, renamed, or its module fails to import: this module must still import
        return None
    return found if isinstance(found, type) and issubclass(found, torch.nn.Module) else None


class _Missing(torch.nn.Module):
    """Stands in for a private class that did not import, so the subclasses below still define;
    `speed_up_decoder` then rebuilds nothing."""


def _private(name: str) -> type:
    return _lookup(name) or type(name, (_Missing,), {"__module__": __name__})


CogVideoXCausalConv3d = _private("CogVideoXCausalConv3d")
CogVideoXResnetBlock3D = _private("CogVideoXResnetBlock3D")
CogVideoXSpatialNorm3D = _private("CogVideoXSpatialNorm3D")
CogVideoXUpsample3D = _private("CogVideoXUpsample3D")
_BASES = {
    cls.__name__: cls
    for cls in (CogVideoXCausalConv3d, CogVideoXResnetBlock3D, CogVideoXSpatialNorm3D, CogVideoXUpsample3D)
}


def _time_parts(frames: int, latent_frames: int) -> list[tuple[slice, slice]]:
    """diffusers' split of a feature map's frames and the latent's frames before interpolating:
    the first frame apart when the map has an odd count over 1."""
    if frames > 1 and frames % 2 == 1:
        return [(slice(0, 1), slice(0, 1)), (slice(1, frames), slice(1, latent_frames))]
    return [(slice(0, frames), slice(0, latent_frames))]


def _power_of_two_ratio(size: int, latent_size: int) -> int | None:
    """`size // latent_size` when it is a power of two: then nearest interpolation repeats each
    latent element exactly that many times (other ratios round their source index in float)."""
    if latent_size < 1 or size % latent_size:
        return None
    ratio = size // latent_size
    return ratio if ratio & (ratio - 1) == 0 else None


class SpatialNorm3D(CogVideoXSpatialNorm3D):
    def forward(self, f, zq, conv_cache=None):
        b, c, _, height, width = f.shape
        h, w = zq.shape[3:]
        parts = [(f[:, :, fs].shape[2], zs) for fs, zs in _time_parts(f.shape[2], zq.shape[2])]
        repeats = [_power_of_two_ratio(frames, zq[:, :, zs].shape[2]) for frames, zs in parts]
        sy, sx = _power_of_two_ratio(height, h), _power_of_two_ratio(width, w)
        if sy is None or sx is None or None in repeats:
            return super().forward(f, zq, conv_cache)
        scale, shift = self.conv_y.conv(zq), self.conv_b.conv(zq)  # kernel 1: no temporal cache
        out = self.norm_layer(f)
        start = 0
        for (frames, zs), r in zip(parts, repeats, strict=True):
            n = frames // r
            grid = out[:, :, start : start + frames].view(b, c, n, r, h, sy, w, sx)
            grid.mul_(scale[:, :, zs].reshape(b, c, n, 1, h, 1, w, 1))
            grid.add_(shift[:, :, zs].reshape(b, c, n, 1, h, 1, w, 1))
            start += frames
        return out, {}


def _fold_taps(weight: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 2 taps that a 3-tap kernel along `dim` applies to a 2× nearest-upsampled signal, seen
    from the original signal, for even (0) or odd (1) output positions."""
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack((k0, k1 + k2) if phase == 0 else (k0 + k1, k2), dim)


class Upsample3D(CogVideoXUpsample3D):
    def forward(self, inputs):
        conv = self.conv
        shape = (conv.kernel_size, conv.stride, conv.padding)
        if conv.weight.dtype != torch.float32 or shape != ((3, 3), (1, 1), (1, 1)):
            return super().forward(inputs)
        b, c, t, h, w = inputs.shape
        frames = F.pad(inputs.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), (1, 1, 1, 1))
        out = frames.new_empty(b * t, conv.out_channels, 2 * h, 2 * w)
        phases = out.view(b * t, conv.out_channels, h, 2, w, 2)
        for row in (0, 1):
            rows = _fold_taps(conv.weight, 2, row)
            for col in (0, 1):
                window = frames[:, :, row : row + h + 1, col : col + w + 1]
                phases[:, :, :, row, :, col] = F.conv2d(window, _fold_taps(rows, 3, col), conv.bias)
        out = out.view(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.compress_time and t > 1:  # diffusers doubles the frames in time (an odd count's first once)
            first = [0] if t % 2 == 1 else []
            out = out[:, :, first + [i for i in range(len(first), t) for _ in (0, 1)]]
        return out


def _slow_on_cpu(x: torch.Tensor) -> bool:
    """Whether PyTorch runs a 3D convolution of the batch-1 input `x` with its native CPU kernel
    (im2col: about 20× slower and far larger than oneDNN's) instead of oneDNN: it does when
    N·C·D·H is at most 20480 (checked on torch 2.14). diffusers' input, padded by two frames, can
    be over that where ours is not, as in the tiny test VAE."""
    return x.device.type == "cpu" and x.shape[0] == 1 and x.shape[1] * x.shape[2] * x.shape[3] <= 20480


class CausalConv3d(CogVideoXCausalConv3d):
    fold_small_inputs = False
    """Fold also where `_slow_on_cpu` would hand the input to diffusers (the load-time check's
    small latent, so that the fold is checked there too; same results, only slower)."""

    def forward(self, inputs, conv_cache=None):
        conv, k = self.conv, self.time_kernel_size
        if (
            conv_cache is not None
            or (_slow_on_cpu(inputs) and not self.fold_small_inputs)
            or self.pad_mode == "replicate"
            or k < 2
            or inputs.shape[2] < k - 1
            or conv.weight.dtype != torch.float32
            or conv.stride[0] != 1
            or conv.dilation[0] != 1
        ):
            return super().forward(inputs, conv_cache)
        return self._folded(inputs)

    def _folded(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first frame batch's output and its `conv_cache` (the last k-1 input frames)."""
        conv, k = self.conv, self.time_kernel_size
        # output frame t reads padded frames t..t+k-1, i.e. frame max(t + j - (k - 1), 0) with tap j
        outputs = []
        for t in range(k - 1):
            first = conv.weight[:, :, : k - t].sum(2)
            frame = F.conv2d(inputs[:, :, 0], first, conv.bias, padding=conv.padding[1:])
            for j in range(k - t, k):
                tap = F.conv2d(inputs[:, :, t + j - (k - 1)], conv.weight[:, :, j], padding=conv.padding[1:])
                frame = frame + tap
            outputs.append(frame[:, :, None])
        if inputs.shape[2] >= k:
            outputs.append(conv(inputs))
        return torch.cat(outputs, 2), inputs[:, :, -(k - 1) :].clone()


def _rebuilt(cls, module: torch.nn.Module, **init) -> torch.nn.Module:
    """`module` as an instance of its subclass `cls`, holding the very same parameters."""
    with torch.device("meta"):
        new = cls(**init)
    new.load_state_dict(module.state_dict(keep_vars=True), assign=True)
    return new.train(module.training)


def _faster(module: torch.nn.Module) -> torch.nn.Module:
    kind = type(module)
    if kind is CogVideoXSpatialNorm3D:
        norm = module.norm_layer
        return _rebuilt(
            SpatialNorm3D, module, f_channels=norm.num_channels, zq_channels=module.conv_y.conv.in_channels,
            groups=norm.num_groups,
        )
    if kind is CogVideoXUpsample3D:
        conv = module.conv
        return _rebuilt(
            Upsample3D, module, in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
            compress_time=module.compress_time,
        )
    if kind is CogVideoXCausalConv3d:
        conv = module.conv
        return _rebuilt(
            CausalConv3d, module, in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=conv.kernel_size, stride=conv.stride, dilation=conv.dilation[0],
            pad_mode=module.pad_mode,
        )
    return module


def _unmet_assumption(decoder: torch.nn.Module) -> str | None:
    """What no longer holds of the private classes this module relies on (and of their instances
    in `decoder`), or None."""
    for name, (where, methods, _) in _PRIVATE.items():
        found = _lookup(name)
        if found is None:
            return f"{where}.{name} does not import"
        if found is not _BASES[name]:
            return f"{where}.{name} is not the class that {__name__} subclassed when it was imported"
        for method, expected in methods.items():
            try:
                taken = tuple(inspect.signature(getattr(found, method)).parameters)[1:]
            except (TypeError, ValueError) as e:
                return f"{name}.{method}'s signature cannot be read ({e})"
            if taken != expected:
                return f"{name}.{method} takes ({', '.join(taken)}) where ({', '.join(expected)}) was expected"
    for module in decoder.modules():
        for name, (_, _, attributes) in _PRIVATE.items():
            if isinstance(module, _BASES[name]):
                for path in attributes:
                    try:
                        operator.attrgetter(path)(module)
                    except AttributeError:
                        return f"a {name} has no attribute {path}"
    return None


Swaps = list[tuple[torch.nn.Module, str, torch.nn.Module]]


def _rebuild(decoder: torch.nn.Module, swaps: Swaps) -> None:
    """Rebuild `decoder`'s modules in place, recording each (parent, name, original) in `swaps`."""

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = _faster(child)
            if new is not child:
                swaps.append((parent, name, child))
                setattr(parent, name, new)
            if isinstance(new, CogVideoXResnetBlock3D) and not hasattr(new, "temb_proj"):
                swaps.append((new, "nonlinearity", new.nonlinearity))
                new.nonlinearity = torch.nn.SiLU(inplace=True)  # its inputs are fresh norm outputs
            visit(new)

    visit(decoder)


def _restore(swaps: Swaps) -> None:
    for parent, name, original in reversed(swaps):
        setattr(parent, name, original)


@contextlib.contextmanager
def _checking(decoder: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Every folded path taken, and on CUDA cuDNN's convolutions in full float32 (TF32 rounds
    the folded and the stock convolutions differently), for the duration of the check."""
    convs = [m for m in decoder.modules() if isinstance(m, CausalConv3d)]
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        for m in convs:
            m.fold_small_inputs = True
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        for m in convs:
            del m.fold_small_inputs  # back to the class's default


def _decoded(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents, return_dict=False)[0]


def _difference(rebuilt: torch.Tensor, stock: torch.Tensor) -> str | None:
    """How the rebuilt decoder's check frames differ from diffusers', or None if they agree."""
    if rebuilt.shape != stock.shape or rebuilt.dtype != stock.dtype:
        return (
            f"the rebuilt decoder gave {rebuilt.dtype} frames of shape {tuple(rebuilt.shape)} where diffusers' "
            f"gave {stock.dtype} {tuple(stock.shape)}"
        )
    delta = (rebuilt.double() - stock.double()).abs().max().item()
    if stock.dtype in (torch.float32, torch.float64):
        scale = stock.abs().max().item()
        if delta <= FP32_TOLERANCE * scale:  # False for NaN
            return None
        return (
            f"the rebuilt decoder's {stock.dtype} frames differ from diffusers' by max |Δ| {delta:.3g} "
            f"(allowed: {FP32_TOLERANCE:g} × their largest magnitude {scale:.3g})"
        )
    if torch.equal(rebuilt, stock):
        return None
    return (
        f"the rebuilt decoder's {stock.dtype} frames differ from diffusers' (max |Δ| {delta:.3g}; they must be "
        "bit-identical)"
    )


def _said(e: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = first_line(e, 10_000)
    return text if text == type(e).__name__ else f"{type(e).__name__}: {text}"


def _warn(problem: str) -> None:
    import diffusers

    logger.warning(
        "diffusers %s: %s; the VAE decodes with diffusers' own decoder (the same frames, more slowly and in "
        "more memory)",
        diffusers.__version__,
        problem,
    )


def speed_up_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    """Rebuild `vae.decoder`'s modules as the subclasses above (the parameters are shared, not
    copied; the state dict's keys do not change), check the result against diffusers' own decoder
    (the module docstring), and keep diffusers' modules with one warning if anything differs.
    Returns `vae`."""
    problem = _unmet_assumption(vae.decoder)
    if problem is not None:
        _warn(problem)
        return vae
    weight = next(vae.decoder.parameters())
    swaps: Swaps = []
    if weight.device.type == "meta":
        try:
            _rebuild(vae.decoder, swaps)
        except Exception as e:
            _restore(swaps)
            _warn(f"rebuilding the decoder raised {_said(e)}")
        return vae
    shape = (1, vae.config.latent_channels, *CHECK_LATENT)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            stock = _decoded(vae, latents)
        except Exception as e:
            _warn(f"its own decoder raised {_said(e)} on the check's latent, so nothing was rebuilt")
            return vae
        stage = "rebuilding the decoder"
        try:
            _rebuild(vae.decoder, swaps)
            stage = "the rebuilt decoder"
            with _checking(vae.decoder, weight.device):
                problem = _difference(_decoded(vae, latents), stock)
        except Exception as e:
            problem = f"{stage} raised {_said(e)}"
    if problem is not None:
        _restore(swaps)
        _warn(problem)
    return vae


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
