"""The faster VAE decoder (`consisid_core.decoder`) against diffusers' own decoder, same weights.

Tolerance: max |Δ| <= 1e-4 on fp32 frames in 0..1 (the parity tolerance); bf16 bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from consisid_core.checkpoint import load_vae_file
from consisid_core.decoder import CausalConv3d, SpatialNorm3D, Upsample3D, speed_up_decoder
from consisid_core.sampling import Tiling, decode
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
    latents = _latents((1, 5, 4, 8, 12), torch.bfloat16).permute(0, 2, 1, 3, 4)
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
