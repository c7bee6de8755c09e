"""A faster CogVideoX VAE decoder with the same results: `speed_up_decoder(vae)`.

The loaders rebuild three kinds of the decoder's diffusers modules as the subclasses below (same
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
  one 2D kernel per output frame.

The last two sum weights, which is exact to float32 rounding but in bf16/fp16 rounds the sums
(measured on the tiny VAE in bf16: each gave 2-3 % more error against an fp32 decode than
diffusers' own half-precision decode), so in half precision they run diffusers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (
    CogVideoXCausalConv3d,
    CogVideoXResnetBlock3D,
    CogVideoXSpatialNorm3D,
)
from diffusers.models.upsampling import CogVideoXUpsample3D


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
    def forward(self, inputs, conv_cache=None):
        conv, k = self.conv, self.time_kernel_size
        if (
            conv_cache is not None
            or _slow_on_cpu(inputs)
            or self.pad_mode == "replicate"
            or k < 2
            or inputs.shape[2] < k - 1
            or conv.weight.dtype != torch.float32
            or conv.stride[0] != 1
            or conv.dilation[0] != 1
        ):
            return super().forward(inputs, conv_cache)
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


def speed_up_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    """Rebuild `vae.decoder`'s modules as the subclasses above (the parameters are shared, not
    copied; the state dict's keys do not change). Returns `vae`."""

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = _faster(child)
            if new is not child:
                setattr(parent, name, new)
            if isinstance(new, CogVideoXResnetBlock3D) and not hasattr(new, "temb_proj"):
                new.nonlinearity = torch.nn.SiLU(inplace=True)  # its inputs are fresh norm outputs
            visit(new)

    visit(vae.decoder)
    return vae
