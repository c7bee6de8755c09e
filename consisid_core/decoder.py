"""The CogVideoX VAE decoder, rebuilt faster with the same results (`speed_up_decoder(vae)`).

The loaders rebuild three kinds of the decoder's modules as the subclasses below (same parameters,
same outputs within float32 rounding) and check the rebuilt decoder against diffusers' own at every
load; on any difference the stock modules are put back with one warning. This is the one module
that relies on diffusers' private CogVideoX VAE classes. How each rebuild works and what the check
compares: docs/dev/architecture.md, "The faster VAE decoder".
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import first_line

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
    (docs/dev/architecture.md), and keep diffusers' modules with one warning if anything differs.
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
