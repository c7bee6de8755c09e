"""Memory, in one place: where models sit during a run (`placed`), estimates of a run's working
memory from the configs alone, and the check that a run fits the machine before it starts.

The estimates are calibrated against `python -m bench.gpu_memory --size real` (live tensors of
each phase counted on the meta device) and the medium bench's measured peaks; they serve both
what the nodes ask ComfyUI to reserve and the refusal of runs that cannot fit at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

from .checks import latent_frames
from .tiling import Tiling, spatial_scale
from .errors import ConsisIDError

DECODE_BYTES_PER_LATENT = 307_000 * 4
"""Peak working memory of a whole-frame decode, per latent voxel of the VAE's first frame batch,
in bytes at fp32, for the released VAE architecture with the decoder our loaders return
(`decoder.speed_up_decoder`): `python -m bench.gpu_memory --size real` counts 9.95 GB of live
tensors for 49 frames at 480×720 in bf16 (3 latent frames of 60×90 at a time; diffusers' own
decoder 15.8 GB), and at the medium size (3 latent frames of 20×30, fp32) this gives 2,108 MiB
against the 2,332 MiB of RSS `python -m bench --size medium` measures."""

SAMPLING_ACTIVATIONS_PER_TOKEN = 13
"""Peak activations of one transformer forward, in token-widths (tokens × the transformer's inner
width) per token of the guided batch: `python -m bench.gpu_memory --size real` counts 2.82 GB for
2 × 17,776 tokens of width 3,072 in bf16 (12.9)."""

ENCODE_ACTIVATIONS_PER_PIXEL = 2_700
"""Peak activations of the first frame's VAE encode, in elements per pixel (the same estimate:
1.84 GB for one 480×720 frame in bf16)."""


TEXT_ENCODER_WORK = 2**30
"""Working memory of a T5-XXL encode of 226 tokens beyond its weights (generous: ~0.1 GB used)."""


def home_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter's or buffer's device; CPU if it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def placed(modules: list[torch.nn.Module], device: torch.device | str | None) -> Iterator[None]:
    """Move `modules` to `device` for the block and back to where each was, whatever happens.
    `device` None moves nothing (the caller, e.g. ComfyUI's model management, placed them)."""
    if device is None:
        yield
        return
    homes = [home_device(m) for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@contextlib.contextmanager
def kept_home(module: torch.nn.Module) -> Iterator[torch.device]:
    """For the block, whatever moves `module`'s weights (diffusers' group offloading streams them
    to the GPU and back), they are where they were after it. Yields that device."""
    home = home_device(module)
    try:
        yield home
    finally:
        module.to(home)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def sampling_memory(
    transformer_config: Mapping, vae_config: Mapping, dtype: torch.dtype, frames: int, height: int, width: int
) -> int:
    """Estimated working memory (bytes) of sampling at this size beyond the weights: the larger of
    one transformer forward of the guided batch of 2 and the first frame's VAE encode."""
    scale, patch = spatial_scale(vae_config), transformer_config["patch_size"]
    patches = (height // scale // patch) * (width // scale // patch)
    video = latent_frames(frames, vae_config["temporal_compression_ratio"]) * patches
    tokens = 2 * (transformer_config["max_text_seq_length"] + video)
    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    forward = SAMPLING_ACTIVATIONS_PER_TOKEN * tokens * inner
    encode = ENCODE_ACTIVATIONS_PER_PIXEL * height * width
    return max(forward, encode) * dtype_bytes(dtype)


def decode_memory(
    vae_config: Mapping, dtype: torch.dtype, latents_shape: tuple[int, ...], tiling: Tiling | None = None
) -> int:
    """Estimated working memory (bytes) of decoding latents [B, F, C, h, w] with this VAE in
    `dtype`: the VAE decodes at most 3 latent frames at a time (diffusers' frame batches), one
    video at a time with slicing, and one tile at a time with `tiling`."""
    frames, height, width = min(latents_shape[1], 3), latents_shape[-2], latents_shape[-1]
    if tiling is not None:
        scale = spatial_scale(vae_config)
        height, width = min(height, tiling.tile_height // scale), min(width, tiling.tile_width // scale)
    return DECODE_BYTES_PER_LATENT * frames * height * width * dtype_bytes(dtype) // 4


def text_encoder_memory(parameters: int, dtype: torch.dtype) -> int:
    """A T5 of `parameters` parameters in `dtype` and its work."""
    return parameters * dtype_bytes(dtype) + TEXT_ENCODER_WORK


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def available_memory(device: torch.device | str) -> int | None:
    """What a run may use on `device`: a GPU's whole memory (ComfyUI can evict other models), the
    CPU's available memory now (what it holds is already spent); None where it is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_fits(need: int, device: torch.device | str, what: str, lower: str) -> None:
    """Refuse a run whose estimate `need` exceeds what `device` has, naming both and the fix."""
    device = torch.device(device)
    have = available_memory(device)
    if have is not None and need > have:
        where = "GPU memory in all" if device.type == "cuda" else "memory available"
        raise ConsisIDError(
            f"{what} needs about {gigabytes(need)} ({device}), and this machine has {gigabytes(have)} of {where}: {lower}"
        )
