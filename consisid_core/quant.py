"""The transformer's large linear layers in ComfyUI core's quantized formats (`comfy.quant_ops.QUANT_ALGOS`).

Plain tensor math on a state dict in ComfyUI's CogVideoX layout (`native.comfy_key`). Each quantized
layer `<layer>.weight` becomes what core's mixed-precision Linear (`comfy.ops.mixed_precision_ops`)
reads: the stored weight, its scales under the names that format's reader pops, and a
`<layer>.comfy_quant` tensor (the JSON `{"format": …}` as uint8 bytes), which is how core's
Load Diffusion Model knows the file is quantized. Biases, norms, embeddings and the first and last
layers stay as they are. The math is the one comfy-kitchen's own quantizers do (round to nearest),
so a layer is stored as core would store it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import ConsisIDError

QUANTIZED_LAYERS = re.compile(r"blocks\.[0-9]+\.(q|k|v|attn_out|ff_proj|ff_out|norm1\.linear|norm2\.linear)\.weight")
"""The weights quantized: every linear layer of the transformer blocks (attention, feed-forward and
the adaptive norms' modulation): 99.5 % of ConsisID-preview's transformer parameters, but `KEPT`."""

KEPT = "blocks.0.norm1.linear.weight"
"""Stays as it is: core's CogVideoX detection reads the model's sizes from its shape, which a
4-bit format's packed weight halves."""

CONVROT_GROUP = 256
"""The regular Hadamard rotation's size in the ConvRot formats (comfy-kitchen's default)."""

W4A8_GROUP = 16
"""asym_w4a8_int8's weights per group scale."""


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    """Bits per stored weight (scales apart)."""
    columns: int
    """Input features must be a multiple of this."""
    rows: int
    """Output features must be a multiple of this."""
    relative_error: float
    """A bound on ‖dequantized − W‖ / ‖W‖ for a Gaussian weight, with room to spare."""


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float8_e4m3fn", 8, 1, 1, 0.05),  # FP8 e4m3, one scale per layer
    Format("float8_e5m2", 8, 1, 1, 0.1),  # FP8 e5m2, one scale per layer
    Format("mxfp8", 8, 32, 32, 0.05),  # FP8 e4m3, a power-of-two scale per 32 weights
    Format("int8_tensorwise", 8, 1, 1, 0.02),  # INT8, one scale per layer (activations INT8 too)
    Format("nvfp4", 4, 16, 16, 0.15),  # FP4 e2m1, an FP8 scale per 16 weights and one per layer
    Format("convrot_w4a4", 4, CONVROT_GROUP, 1, 0.2),  # INT4, Hadamard-rotated, a scale per row (activations INT4)
    Format("asym_w4a8_int8", 4, CONVROT_GROUP, 1, 0.15),  # INT4, rotated, an FP8 scale per 16 (activations INT8)
)}
"""The formats written, by core's names: those ComfyUI v0.33's Load Diffusion Model reads and samples."""

_FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
F8_E4M3_MAX = 448.0


def quant_entry(config: Mapping) -> torch.Tensor:
    """A layer's `comfy_quant` tensor: its JSON config as uint8 bytes."""
    return torch.tensor(list(json.dumps(dict(config)).encode("utf-8")), dtype=torch.uint8)


def check_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConsisIDError(f"unknown quantized format '{name}': use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_layer(key: str, weight: torch.Tensor, fmt: Format) -> None:
    """Refuse, in one line, a layer `fmt` cannot hold."""
    layer = key.removesuffix(".weight")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ConsisIDError(f"layer '{layer}' is not a 2-D floating-point weight ({weight.dtype}, {tuple(weight.shape)})")
    rows, columns = weight.shape
    if columns % fmt.columns or rows % fmt.rows:
        needs = f"input features a multiple of {fmt.columns}" + (
            f" and output features a multiple of {fmt.rows}" if fmt.rows > 1 else "")
        raise ConsisIDError(f"layer '{layer}' ({rows} × {columns}) cannot be stored as {fmt.name}: it needs {needs}; "
                            "pick another format (float8_e4m3fn and int8_tensorwise take every shape)")
    if not torch.isfinite(weight).all():
        raise ConsisIDError(f"layer '{layer}' has non-finite weights (inf or NaN): nothing to quantize")


def quantize(weights: Mapping[str, torch.Tensor], name: str, release: bool = False) -> dict[str, torch.Tensor]:
    """`weights` (ComfyUI's CogVideoX layout) with the `QUANTIZED_LAYERS` in format `name`; the
    other tensors as they are. Every layer is checked before any is quantized. With `release`
    (`weights` a dict of the caller's that it no longer needs) each full-precision weight is taken
    out of `weights` as it is quantized, so both are never held whole at once."""
    fmt = check_format(name)
    chosen = [k for k in weights if QUANTIZED_LAYERS.fullmatch(k) and k != KEPT]
    if not chosen:
        raise ConsisIDError("these weights have no transformer-block linear layers to quantize "
                            "(not a CogVideoX transformer in ComfyUI's layout)")
    for key in chosen:
        check_layer(key, weights[key], fmt)
    out = dict(weights)
    for key in chosen:
        layer = key.removesuffix(".weight")
        del out[key]
        stored, config = _QUANTIZERS[name]((weights.pop(key) if release else weights[key]).float())
        out |= {f"{layer}.{suffix}": tensor.contiguous() for suffix, tensor in stored.items()}
        out[f"{layer}.comfy_quant"] = quant_entry({"format": name} | config)
    return out


# ---------------------------------------------------------------------------------------------
# The formats: each returns ({key suffix: tensor}, extra comfy_quant fields) for one fp32 weight


def _fp8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
    top = torch.finfo(dtype).max
    scale = (weight.abs().amax() / top).clamp(min=torch.finfo(torch.float32).tiny)
    stored = (weight * (1.0 / scale)).clamp(-top, top).to(dtype)
    return {"weight": stored, "weight_scale": scale}, {}


def _int8_tensorwise(weight: torch.Tensor) -> tuple[dict, dict]:
    scale = (weight.abs().amax() / 127.0).clamp(min=1e-30)
    return {"weight": (weight / scale).round().clamp(-128, 127).to(torch.int8), "weight_scale": scale}, {}


def swizzled(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, blocks] in cuBLAS's tiled layout (128 × 4 tiles, zero-padded), as
    comfy-kitchen stores them for mxfp8 and nvfp4."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = scales.new_zeros(row_tiles * 128, col_tiles * 4)
    padded[:rows, :cols] = scales
    tiles = padded.view(row_tiles, 128, col_tiles, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(row_tiles * 128, col_tiles * 4)


def _mxfp8(weight: torch.Tensor) -> tuple[dict, dict]:
    rows, columns = weight.shape
    blocks = weight.view(rows, columns // 32, 32)
    peak = blocks.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2((peak / F8_E4M3_MAX).clamp(min=2.0**-127))).to(torch.int32) + 127
    exponent = exponent.clamp(0, 254)
    scale = torch.where(peak == 0, 1.0, torch.ldexp(torch.ones_like(peak), exponent - 127))
    stored = (blocks / scale.unsqueeze(-1)).clamp(-F8_E4M3_MAX, F8_E4M3_MAX).view(rows, columns)
    exponent = torch.where(peak == 0, 0, exponent).to(torch.uint8)
    return {"weight": stored.to(torch.float8_e4m3fn), "weight_scale": swizzled(exponent)}, {}


def fp4_codes(values: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 codes (uint8, sign in bit 3) of values within ±6, rounded to nearest, ties to even."""
    table = _FP4_VALUES.to(values.device)
    magnitude = values.abs()
    midpoints = (table[1:] + table[:-1]) / 2
    code = torch.bucketize(magnitude, midpoints)  # a value on a midpoint goes to the lower code
    tie = (code < 7) & (magnitude == midpoints[code.clamp(max=6)]) & (code % 2 == 1)
    code = code + tie.to(code.dtype)
    return (code + 8 * torch.signbit(values)).to(torch.uint8)


def _nvfp4(weight: torch.Tensor) -> tuple[dict, dict]:
    rows, columns = weight.shape
    layer_scale = (weight.abs().amax() / (F8_E4M3_MAX * 6.0)).clamp(min=torch.finfo(torch.float32).tiny)
    blocks = weight.view(rows, columns // 16, 16)
    block_scale = (blocks.abs().amax(dim=-1) / 6.0 / layer_scale).clamp(max=F8_E4M3_MAX).to(torch.float8_e4m3fn)
    total = layer_scale * block_scale.float()
    scaled = torch.where(total.unsqueeze(-1) == 0, 0.0, blocks / torch.where(total == 0, 1.0, total).unsqueeze(-1))
    codes = fp4_codes(scaled.clamp(-6.0, 6.0).view(rows, columns))
    packed = codes[:, 0::2] << 4 | codes[:, 1::2]
    return {"weight": packed, "weight_scale": swizzled(block_scale), "weight_scale_2": layer_scale}, {}


def hadamard(size: int = CONVROT_GROUP) -> torch.Tensor:
    """The regular orthonormal Hadamard matrix of ConvRot (Kronecker powers of a 4 × 4 one)."""
    h4 = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / size**0.5


def rotated(weight: torch.Tensor) -> torch.Tensor:
    """W with each group of `CONVROT_GROUP` input features rotated: W_g · Hᵀ."""
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // CONVROT_GROUP, CONVROT_GROUP)
    return torch.matmul(grouped, hadamard().T).reshape(rows, columns)


def packed_int4(values: torch.Tensor) -> torch.Tensor:
    """4-bit values (their low nibble) two per int8, the even column in the low nibble."""
    values = values.to(torch.int32)
    return ((values[:, 0::2] & 0xF) | ((values[:, 1::2] & 0xF) << 4)).to(torch.int8)


def _convrot_w4a4(weight: torch.Tensor) -> tuple[dict, dict]:
    turned = rotated(weight)
    scale = turned.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 7
    codes = (turned / scale).round().clamp(-7, 7).to(torch.int8)
    return ({"weight": packed_int4(codes), "weight_scale": scale.reshape(-1)},
            {"convrot_groupsize": CONVROT_GROUP})


def _asym_w4a8_int8(weight: torch.Tensor) -> tuple[dict, dict]:
    rows, columns = weight.shape
    grouped = rotated(weight).view(rows, columns // W4A8_GROUP, W4A8_GROUP)
    group_scale = (grouped.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-8)
    signed = (grouped / group_scale).round().clamp(-8, 7)
    channel = ((signed * group_scale).abs().amax(dim=(1, 2)) / 127.0).clamp(min=1e-8)
    relative = (group_scale.squeeze(-1) / channel.unsqueeze(1)).to(torch.float8_e4m3fn)
    return ({"weight": packed_int4((signed + 8).view(rows, columns)), "weight_s_rel": relative,
             "weight_s_channel": channel},
            {"group_size": W4A8_GROUP, "convrot_groupsize": CONVROT_GROUP})


_QUANTIZERS: dict[str, Callable[[torch.Tensor], tuple[dict, dict]]] = {
    "float8_e4m3fn": lambda w: _fp8(w, torch.float8_e4m3fn),
    "float8_e5m2": lambda w: _fp8(w, torch.float8_e5m2),
    "mxfp8": _mxfp8,
    "int8_tensorwise": _int8_tensorwise,
    "nvfp4": _nvfp4,
    "convrot_w4a4": _convrot_w4a4,
    "asym_w4a8_int8": _asym_w4a8_int8,
}
