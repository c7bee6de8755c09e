"""ComfyUI core's quantized formats (consisid_core/quant.py): each layout read back the way core's
reader reads it (written out here from comfy/ops.py and comfy-kitchen's eager backend), within the
format's rounding bound; `export --quant`; every refusal. Core's own reader and sampler on these
files: tests/comfyui/test_quant_comfyui.py."""

import inspect
import json

import pytest
import torch
from safetensors import safe_open

from consisid_core import native, quant
from consisid_core.cli import main
from consisid_core.errors import ConsisIDError

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def weight(rows: int = 64, columns: int = 512, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed values over several magnitudes, a zero row and a zero block of 32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * torch.exp(torch.randn(rows, columns, generator=g))
    w[3] = 0
    w[5, 64:96] = 0
    return w * 0.02


def unswizzled(tiles: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """comfy-kitchen's from_blocked: block scales out of cuBLAS's 128 × 4 tiles."""
    row_tiles, col_tiles = -(-rows // 128), -(-columns // 4)
    step = tiles.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(row_tiles, col_tiles, 128, 4)
    return step.permute(0, 2, 1, 3).reshape(row_tiles * 128, col_tiles * 4)[:rows, :columns]


def unpacked_nibbles(packed: torch.Tensor, high_first: bool) -> torch.Tensor:
    p = packed.view(torch.uint8).to(torch.int32)
    high, low = p >> 4, p & 0xF
    pair = (high, low) if high_first else (low, high)
    return torch.stack(pair, dim=-1).reshape(packed.shape[0], -1)


def unrotated(rotated: torch.Tensor) -> torch.Tensor:
    """W_g · Hᵀ undone: H is orthonormal, so W_g = R_g · H."""
    rows, columns = rotated.shape
    return (rotated.reshape(rows, -1, 256) @ quant.hadamard()).reshape(rows, columns)


def decoded(stored: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight as core's reader dequantizes it, the largest rounding error each element may have)."""
    w, s = stored["weight"], stored.get("weight_scale")
    if name in ("float8_e4m3fn", "float8_e5m2"):
        mantissa, tiny = (2**-4, 2**-10) if name == "float8_e4m3fn" else (2**-3, 2**-17)
        value = w.float() * s
        return value, torch.maximum(value.abs() * mantissa, s * tiny) * 1.0001
    if name == "int8_tensorwise":
        return w.float() * s, (s / 2).expand(w.shape)
    if name == "mxfp8":
        exponent = unswizzled(s, w.shape[0], w.shape[1] // 32).to(torch.int32) - 127
        block = torch.ldexp(torch.ones(exponent.shape), exponent)
        block = block.repeat_interleave(32, dim=1)
        value = w.float() * block
        return value, torch.maximum(value.abs() * 2**-4, block * 2**-10) * 1.0001
    if name == "nvfp4":
        rows, columns = w.shape[0], w.shape[1] * 2
        block = unswizzled(s, rows, columns // 16).float().repeat_interleave(16, dim=1) * stored["weight_scale_2"]
        value = FP4[unpacked_nibbles(w, high_first=True)] * block
        return value, block * 1.0001
    low_high = unpacked_nibbles(w, high_first=False)
    if name == "convrot_w4a4":
        signed = torch.where(low_high > 7, low_high - 16, low_high).float()
        return unrotated(signed * s.unsqueeze(1)), (s / 2).unsqueeze(1).expand(signed.shape)
    group = stored["weight_s_rel"].float().repeat_interleave(16, dim=1)  # asym_w4a8_int8, no codebook
    channel = stored["weight_s_channel"].unsqueeze(1)
    levels = ((low_high - 8).float() * group).round().clamp(-127, 127)
    # the int4 step (its half), the FP8 group scale's rounding (2⁻⁴ of up to 7 steps), the INT8 grid
    return unrotated(levels * channel), (group * (0.5 + 7 * 2**-4) + 0.5) * channel


@pytest.mark.parametrize("name", quant.FORMATS)
def test_each_format_reads_back_within_its_rounding(name):
    w = weight()
    stored, extra = quant._QUANTIZERS[name](w)
    value, bound = decoded(stored, name)
    error = value - w
    if name in ("convrot_w4a4", "asym_w4a8_int8"):  # bounded in the rotated basis: per row in L2
        assert (error.norm(dim=1) <= bound.norm(dim=1) * 1.0001).all()
    else:
        assert (error.abs() <= bound).all(), (error.abs() - bound).max()
    assert error.abs().max() > 0
    assert torch.equal(value[3], torch.zeros_like(value[3]))  # a zero row stays zero
    gaussian = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))  # the bound FORMATS states
    again, _ = decoded(quant._QUANTIZERS[name](gaussian)[0], name)
    assert 0 < ((again - gaussian).norm() / gaussian.norm()).item() <= quant.FORMATS[name].relative_error


def test_fp4_codes_round_to_nearest_ties_to_even():
    assert torch.equal(FP4[quant.fp4_codes(FP4).long()], FP4)
    assert torch.equal(torch.signbit(FP4[quant.fp4_codes(FP4).long()]), torch.signbit(FP4))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0])
    assert FP4[quant.fp4_codes(ties).long()].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]
    near = torch.tensor([0.26, 0.74, 4.9, 5.1, 5.99])
    assert FP4[quant.fp4_codes(near).long()].tolist() == [0.5, 0.5, 4.0, 6.0, 6.0]


def test_swizzled_scales_come_back_in_place():
    scales = torch.arange(200 * 9, dtype=torch.float32).reshape(200, 9)
    tiles = quant.swizzled(scales)
    assert tiles.shape == (256, 12)
    assert torch.equal(unswizzled(tiles, 200, 9), scales)


def test_quantize_keeps_what_it_does_not_quantize(native_tiny_dir):
    core, _ = native.split_weights(native.source_weights(native_tiny_dir)[0])
    stored = quant.quantize(core, "float8_e4m3fn")
    chosen = {k for k in core if quant.QUANTIZED_LAYERS.fullmatch(k)} - {quant.KEPT}
    assert chosen and "blocks.1.norm1.linear.weight" in chosen and quant.KEPT in core
    for key in chosen:
        layer = key.removesuffix(".weight")
        assert stored[key].dtype == torch.float8_e4m3fn and stored[f"{layer}.weight_scale"].ndim == 0
        assert json.loads(bytes(stored[f"{layer}.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    for key in set(core) - chosen:
        assert torch.equal(stored[key], core[key])
    assert not any(k.endswith(".comfy_quant") for k in core)


def test_export_quant_writes_the_format_and_leaves_the_face_layers_alone(native_tiny_dir, tmp_path, capsys):
    assert main(["export", "--model", str(native_tiny_dir), "--out", str(tmp_path), "--name", "q", "--quant", "nvfp4"]) == 0
    assert main(["export", "--model", str(native_tiny_dir), "--out", str(tmp_path), "--name", "full"]) == 0
    with safe_open(tmp_path / "q_transformer.safetensors", framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    core, face = native.split_weights(native.source_weights(native_tiny_dir)[0])
    expected = quant.quantize(core, "nvfp4")
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in stored)
    assert stored["blocks.0.q.weight"].dtype == torch.uint8 and stored["blocks.0.q.weight_scale"].dtype == torch.float8_e4m3fn
    with safe_open(tmp_path / "q_face.safetensors", framework="pt") as q, \
            safe_open(tmp_path / "full_face.safetensors", framework="pt") as full:
        assert q.metadata() == full.metadata()
        assert all(torch.equal(q.get_tensor(k), face[k]) for k in q.keys()) and set(q.keys()) == set(face)
    quantized = (tmp_path / "q_transformer.safetensors").stat().st_size
    assert quantized < 0.5 * (tmp_path / "full_transformer.safetensors").stat().st_size


@pytest.mark.parametrize(("args", "message"), [
    (["--quant", "q4_k"], "unknown quantized format 'q4_k': use one of float8_e4m3fn, "),
    (["--quant", "mxfp8"], "layer 'blocks.0.norm2.linear' (384 × 16) cannot be stored as mxfp8: it needs input features "
                           "a multiple of 32"),
    (["--quant", "convrot_w4a4"], "(64 × 64) cannot be stored as convrot_w4a4: it needs input features a multiple "
                                  "of 256; pick another format"),
])
def test_export_refuses_in_one_line_and_writes_nothing(native_tiny_dir, tmp_path, capsys, args, message):
    assert main(["export", "--model", str(native_tiny_dir), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not list(tmp_path.iterdir())


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(ConsisIDError, match="non-finite weights"):
        quant.quantize({"blocks.1.q.weight": torch.tensor([[1.0, float("nan")]])}, "float8_e4m3fn")
    with pytest.raises(ConsisIDError, match="not a 2-D floating-point weight"):
        quant.quantize({"blocks.1.q.weight": torch.ones(4, 4, dtype=torch.int8)}, "int8_tensorwise")
    with pytest.raises(ConsisIDError, match="no transformer-block linear layers"):
        quant.quantize({"proj_out.weight": torch.ones(4, 4)}, "int8_tensorwise")
    with pytest.raises(ConsisIDError, match="output features a multiple of 16"):
        quant.quantize({"blocks.1.q.weight": torch.ones(8, 16)}, "nvfp4")


def test_native_model_loaders_quantize_input_offers_every_format(home):
    """ComfyUI checks the combo against its choices before a run (VALIDATE_INPUTS leaves it to it; a
    script's other value is refused at the node's start: tests/comfyui/test_adversarial_native.py)."""
    from workflow_tools import import_pack

    import_pack()
    from consisid_pack.nodes.native.nodes import ConsisIDNativeModelLoader

    loader = ConsisIDNativeModelLoader
    assert loader.INPUT_TYPES()["optional"]["quantize"][0] == ["off", *quant.FORMATS]
    assert "quantize" not in inspect.signature(loader.VALIDATE_INPUTS).parameters


def test_quantize_with_release_takes_each_weight_out_as_it_goes(native_tiny_dir):
    core, _ = native.split_weights(native.source_weights(native_tiny_dir)[0])
    expected = quant.quantize(core, "int8_tensorwise")
    mine = dict(core)
    stored = quant.quantize(mine, "int8_tensorwise", release=True)
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in stored)
    assert "blocks.1.q.weight" not in mine and quant.KEPT in mine and "blocks.1.q.weight" in core
