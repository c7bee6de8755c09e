"""The faster VAE decoder (`consisid_core.decoder`) against diffusers' own decoder, same weights,
and its check at load: passing on this diffusers, and with each assumption about diffusers'
private classes broken on purpose, falling back to diffusers' own modules with one warning.

Tolerance: max |Δ| <= 1e-4 on fp32 frames in 0..1 (the parity tolerance); bf16 bit for bit; after
a fallback, bit for bit in every dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from consisid_core.decoder import CausalConv3d, SpatialNorm3D, Upsample3D, speed_up_decoder
from consisid_core.sampling import decode
from consisid_core.single_file import load_vae_file
from consisid_core.tiling import Tiling
from consisid_core.tiny import TINY_VAE

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """The tiny VAE with every weight moved off its initial value (GroupNorm scales of 1 and
    biases of 0 would hide mistakes), written as diffusers writes it."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**TINY_VAE)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def _both(vae_dir, dtype):
    from diffusers import AutoencoderKLCogVideoX

    ours = load_vae_file(vae_dir / "diffusion_pytorch_model.safetensors", dtype, config=vae_dir / "config.json")
    theirs = AutoencoderKLCogVideoX.from_pretrained(vae_dir, torch_dtype=ours.dtype).eval()
    return ours, theirs


def _latents(shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 4, 16, 24),  # 9 frames: one frame batch, padded in time by repeating its first frame
        (1, 13, 4, 8, 12),  # 49 frames: six batches, the later ones with the temporal caches
        (1, 1, 4, 8, 12),  # one frame
        (2, 2, 4, 6, 10),  # two videos, an even number of latent frames
    ],
)
def test_fp32_frames_match_diffusers(vae_dir, shape):
    ours, theirs = _both(vae_dir, "fp32")
    latents = _latents(shape)
    with torch.no_grad():
        fast, reference = decode(ours, latents), decode(theirs, latents)
    assert fast.shape == reference.shape
    assert (fast - reference).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_fp32_tiled_frames_match_diffusers(vae_dir):
    ours, theirs = _both(vae_dir, "fp32")
    latents, tiling = _latents((1, 3, 4, 16, 24)), Tiling.halves(128, 192, 8)
    with torch.no_grad():
        fast, reference = decode(ours, latents, tiling=tiling), decode(theirs, latents, tiling=tiling)
    assert (fast - reference).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_each_faster_path_runs_in_fp32(vae_dir):
    """Hooks on the modules diffusers' forward would call show that ours did not call them."""
    ours, _ = _both(vae_dir, "fp32")
    kinds = {type(m) for m in ours.decoder.modules()}
    assert {SpatialNorm3D, Upsample3D, CausalConv3d} <= kinds
    seen = {"norm conv sizes": [], "upsample convs": [], "conv3d frames": []}

    def record(key, value):
        return lambda module, args, output: seen[key].append(value(args[0]))

    hooks = []
    for m in ours.decoder.modules():
        if isinstance(m, SpatialNorm3D):
            hooks.append(m.conv_y.conv.register_forward_hook(record("norm conv sizes", lambda x: x.shape[3:])))
        elif isinstance(m, Upsample3D):
            hooks.append(m.conv.register_forward_hook(record("upsample convs", lambda x: x.shape)))
    resnet_conv = ours.decoder.up_blocks[-1].resnets[-1].conv2
    hooks.append(resnet_conv.conv.register_forward_hook(record("conv3d frames", lambda x: x.shape[2])))
    with torch.no_grad():
        decode(ours, _latents((1, 3, 4, 16, 24)))  # one frame batch: 9 frames at the last block
        large, seen["conv3d frames"] = seen["conv3d frames"], []
        decode(ours, _latents((1, 3, 4, 8, 12)))
    for h in hooks:
        h.remove()
    assert set(seen["norm conv sizes"]) == {(16, 24), (8, 12)}  # at the latent's size, never the feature maps'
    assert seen["upsample convs"] == []  # four folded 2x2 convolutions instead
    assert set(large) == {9}  # diffusers convolves 9 + 2 padding frames
    # [1, 32, 9, 64, 96] is under PyTorch's size for oneDNN on the CPU: not folded, as diffusers
    assert set(seen["conv3d frames"]) == {11}


@pytest.mark.slow
def test_bf16_is_bit_identical_and_folds_nothing(vae_dir):
    ours, theirs = _both(vae_dir, "bf16")
    calls = []
    upsamplers = [m for m in ours.decoder.modules() if isinstance(m, Upsample3D)]
    hooks = [m.conv.register_forward_hook(lambda *a: calls.append(1)) for m in upsamplers]
    latents = _latents((1, 3, 4, 4, 6), torch.bfloat16).permute(0, 2, 1, 3, 4)  # small: bf16 conv3d is slow on a CPU
    with torch.no_grad():
        fast, reference = ours.decode(latents).sample, theirs.decode(latents).sample
    for h in hooks:
        h.remove()
    assert torch.equal(fast, reference)
    assert calls  # summed weights would round in bf16: diffusers' upsampling ran


def test_parameters_are_shared_and_keys_unchanged(vae_dir):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir)
    before = {name: p.data_ptr() for name, p in vae.named_parameters()}
    speed_up_decoder(vae)
    assert {name: p.data_ptr() for name, p in vae.named_parameters()} == before
    assert any(isinstance(m, SpatialNorm3D) for m in vae.decoder.modules())


# The check at load (`speed_up_decoder`): it passes on this diffusers, and where an assumption
# about diffusers' private classes is broken on purpose, the loaded VAE keeps diffusers' own
# modules, says so once, and its frames equal stock diffusers' bit for bit.

LOGGER = "consisid_core.decoder"
WEIGHTS = "diffusion_pytorch_model.safetensors"
REBUILT = {SpatialNorm3D, Upsample3D, CausalConv3d}


def _load(vae_dir, dtype, caplog):
    """Our loader's VAE, stock diffusers' VAE (same files, same patches), and our warnings."""
    from diffusers import AutoencoderKLCogVideoX

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = load_vae_file(vae_dir / WEIGHTS, dtype, config=vae_dir / "config.json")
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    theirs = AutoencoderKLCogVideoX.from_pretrained(vae_dir, torch_dtype=ours.dtype).eval()
    return ours, theirs, warnings


def _stock_modules(vae) -> bool:
    """No rebuilt module and no in-place SiLU left in the decoder."""
    modules = list(vae.decoder.modules())
    in_place = [m for m in modules if isinstance(m, torch.nn.SiLU) and m.inplace]
    return not REBUILT & {type(m) for m in modules} and not in_place


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_check_passes_on_this_diffusers(vae_dir, dtype, caplog):
    ours, _, warnings = _load(vae_dir, dtype, caplog)
    assert warnings == []
    assert REBUILT <= {type(m) for m in ours.decoder.modules()}
    assert not any(m.fold_small_inputs for m in ours.decoder.modules() if isinstance(m, CausalConv3d))


def test_a_meta_device_vae_is_rebuilt_unchecked(caplog):
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**TINY_VAE)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        speed_up_decoder(vae)
    assert [r for r in caplog.records if r.name == LOGGER] == []
    assert REBUILT <= {type(m) for m in vae.decoder.modules()}


def _scaled_norm(monkeypatch, factor):
    """Our spatial norm's output off by `factor`."""
    forward = SpatialNorm3D.forward

    def wrong(self, f, zq, conv_cache=None):
        out, cache = forward(self, f, zq, conv_cache)
        return out * factor, cache

    monkeypatch.setattr(SpatialNorm3D, "forward", wrong)


def _zero_time_padding(monkeypatch):
    """diffusers pads the first frame batch with zeros instead of repeating its first frame (as an
    upgrade could): the folded first frames no longer match."""
    from diffusers.models.autoencoders import autoencoder_kl_cogvideox as cogvideox

    def padded(self, inputs, conv_cache=None):
        if self.time_kernel_size < 2:
            return inputs
        first = conv_cache if conv_cache is not None else inputs[:, :, :1].new_zeros(
            (*inputs.shape[:2], self.time_kernel_size - 1, *inputs.shape[3:])
        )
        return torch.cat([first, inputs], dim=2)

    monkeypatch.setattr(cogvideox.CogVideoXCausalConv3d, "fake_context_parallel_forward", padded)


def _first_frames_cached(monkeypatch):
    """Our folded convolution hands on the wrong temporal cache (its first frames, not its last):
    only the second frame batch, which diffusers' forward convolves with it, goes wrong."""
    folded = CausalConv3d._folded

    def wrong(self, inputs):
        out, _ = folded(self, inputs)
        return out, inputs[:, :, : self.time_kernel_size - 1].clone()

    monkeypatch.setattr(CausalConv3d, "_folded", wrong)


def _scaled_upsampling_taps(monkeypatch):
    from consisid_core import decoder

    fold = decoder._fold_taps
    monkeypatch.setattr(decoder, "_fold_taps", lambda weight, dim, phase: fold(weight, dim, phase) * 1.001)


def _upsampling_raises(monkeypatch):
    def broken(self, inputs):
        raise RuntimeError("a tensor of the wrong shape")

    monkeypatch.setattr(Upsample3D, "forward", broken)


def _private_class_missing(monkeypatch):
    import diffusers.models.upsampling

    monkeypatch.delattr(diffusers.models.upsampling, "CogVideoXUpsample3D")


def _forward_parameter_added(monkeypatch):
    """diffusers' causal convolution grows a parameter that our override would not pass on."""
    from diffusers.models.autoencoders import autoencoder_kl_cogvideox as cogvideox

    forward = cogvideox.CogVideoXCausalConv3d.forward

    def newer(self, inputs, conv_cache=None, cache_frames=None):
        return forward(self, inputs, conv_cache)

    monkeypatch.setattr(cogvideox.CogVideoXCausalConv3d, "forward", newer)


def _attribute_renamed(monkeypatch):
    """diffusers renames the upsampler's `compress_time` (its own forward reads the new name)."""
    from diffusers.models import upsampling

    init, forward = upsampling.CogVideoXUpsample3D.__init__, upsampling.CogVideoXUpsample3D.forward

    @functools.wraps(init)
    def renamed(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.doubles_frames = self.__dict__.pop("compress_time")

    def reads_the_new_name(self, inputs):
        self.compress_time = self.doubles_frames
        try:
            return forward(self, inputs)
        finally:
            del self.compress_time

    monkeypatch.setattr(upsampling.CogVideoXUpsample3D, "__init__", renamed)
    monkeypatch.setattr(upsampling.CogVideoXUpsample3D, "forward", reads_the_new_name)


def _rebuild_refused(monkeypatch):
    """Our subclass cannot be built (as when diffusers' constructor refuses the arguments given)."""

    def refuses(self, *args, **kwargs):
        raise TypeError("__init__() got an unexpected keyword argument 'compress_time'")

    monkeypatch.setattr(Upsample3D, "__init__", refuses)


BROKEN = {
    "norm-off-by-0.1%": ("fp32", lambda mp: _scaled_norm(mp, 1.001), "frames differ from diffusers' by max"),
    "bf16-norm-off-by-one-step": ("bf16", lambda mp: _scaled_norm(mp, 1 + 2**-6), "must be bit-identical"),
    "zero-time-padding": ("fp32", _zero_time_padding, "frames differ from diffusers' by max"),
    "wrong-temporal-cache": ("fp32", _first_frames_cached, "frames differ from diffusers' by max"),
    "upsampling-taps-off-by-0.1%": ("fp32", _scaled_upsampling_taps, "frames differ from diffusers' by max"),
    "upsampling-raises": ("fp32", _upsampling_raises, "raised RuntimeError: a tensor of the wrong shape"),
    "private-class-missing": ("fp32", _private_class_missing, "upsampling.CogVideoXUpsample3D does not import"),
    "attribute-renamed": ("fp32", _attribute_renamed, "a CogVideoXUpsample3D has no attribute compress_time"),
    "rebuild-refused": ("fp32", _rebuild_refused, "rebuilding the decoder raised TypeError: __init__() got an"),
    "forward-parameter-added": (
        "fp32", _forward_parameter_added, "CogVideoXCausalConv3d.forward takes (inputs, conv_cache, cache_frames)"
    ),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_assumption_gives_stock_frames_and_one_warning(vae_dir, broken, monkeypatch, caplog):
    import diffusers

    dtype, breaks, said = BROKEN[broken]
    breaks(monkeypatch)
    ours, theirs, warnings = _load(vae_dir, dtype, caplog)
    (warning,) = warnings
    assert f"diffusers {diffusers.__version__}: " in warning and said in warning
    assert _stock_modules(ours)
    latents = _latents((1, 5, 4, 2, 3), ours.dtype)
    with torch.no_grad():
        assert torch.equal(decode(ours, latents), decode(theirs, latents))


def test_a_private_class_that_does_not_import_leaves_the_package_importable(vae_dir, tmp_path):
    """diffusers without `CogVideoXUpsample3D` (where a move or rename would leave it) before
    `consisid_core` is imported: the package imports, the VAE loads with a warning, and its
    frames are stock diffusers'."""
    script = tmp_path / "missing.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, logging, sys
            import torch
            import diffusers.models.autoencoders.autoencoder_kl_cogvideox  # holds its own reference
            import diffusers.models.upsampling
            del diffusers.models.upsampling.CogVideoXUpsample3D
            from diffusers import AutoencoderKLCogVideoX
            from consisid_core.single_file import load_vae_file
            from consisid_core.sampling import decode

            warnings = []
            class Keep(logging.Handler):
                def emit(self, record):
                    warnings.append(record.getMessage())
            logging.getLogger("consisid_core.decoder").addHandler(Keep(logging.WARNING))
            folder = {str(vae_dir)!r}
            ours = load_vae_file(folder + "/{WEIGHTS}", "fp32", config=folder + "/config.json")
            theirs = AutoencoderKLCogVideoX.from_pretrained(folder).eval()
            latents = torch.randn(1, 5, 4, 2, 3, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                same = torch.equal(decode(ours, latents), decode(theirs, latents))
            kinds = sorted({{type(m).__module__ for m in ours.decoder.modules()}})
            json.dump({{"warnings": warnings, "same": same, "kinds": kinds}}, sys.stdout)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    (warning,) = result["warnings"]
    assert "diffusers.models.upsampling.CogVideoXUpsample3D does not import" in warning
    assert result["same"] is True
    assert "consisid_core.decoder" not in result["kinds"]
