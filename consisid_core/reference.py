"""The reference pipeline's (diffusers' ConsisIDPipeline's) sampling math, for the native path's
ComfyUI samplers to sample as it does: its rotary embedding, first frame, seeded noise and dynamic
CFG, and its schedule in flow coordinates. Plain torch and diffusers' own functions; no ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .diffusers_hooks import part
from .single_file import RELEASED_SCHEDULER_CONFIG


def rotary_embedding(config: Mapping, grid_height: int, grid_width: int, frames: int, device) -> tuple:
    """The reference pipeline's 3D rotary embedding (cos, sin) for a latent grid of patches,
    cropped to the checkpoint's trained aspect as ConsisIDPipeline does."""
    get_3d_rotary_pos_embed = part("get_3d_rotary_pos_embed")
    get_resize_crop_region_for_grid = part("get_resize_crop_region_for_grid")
    base_width = config["sample_width"] // config["patch_size"]
    base_height = config["sample_height"] // config["patch_size"]
    crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"], crops_coords=crops, grid_size=(grid_height, grid_width),
        temporal_size=frames, device=device,
    )


def alphas_cumprod(scheduler_config: Mapping | None = None) -> torch.Tensor:
    """ᾱ_t of the reference's CogVideoX schedulers (float64; zero-terminal-SNR: ᾱ_999 = 0)."""
    from diffusers import CogVideoXDDIMScheduler

    config = {k: v for k, v in dict(scheduler_config or RELEASED_SCHEDULER_CONFIG).items() if not k.startswith("_")}
    return CogVideoXDDIMScheduler.from_config(config).alphas_cumprod.double()


def flow_sigmas(scheduler_config: Mapping | None = None) -> torch.Tensor:
    """The schedule in flow coordinates, σ_t = √(1-ᾱ_t) / (√ᾱ_t + √(1-ᾱ_t)) (float64, rising to
    exactly 1 at the zero-SNR end).

    A DDPM latent x_t = √ᾱ·x0 + √(1-ᾱ)·ε divided by √ᾱ + √(1-ᾱ) is (1-σ)·x0 + σ·ε: the
    rectified-flow interpolation, finite everywhere. Euler on it is DDIM step for step, and the
    first step at ᾱ = 0 needs no infinite sigma (k-diffusion's σ = √((1-ᾱ)/ᾱ) would be)."""
    a = alphas_cumprod(scheduler_config)
    signal, noise = a.sqrt(), (1 - a).sqrt()
    return noise / (signal + noise)


def flow_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """√ᾱ + √(1-ᾱ) at flow sigma σ: the flow latent times this is the DDPM latent the model takes."""
    return 1 / ((1 - sigma) ** 2 + sigma**2).sqrt()


def first_frame_pixels(frame, height: int, width: int) -> torch.Tensor:
    """The first frame as ConsisIDPipeline prepares it (diffusers' VideoProcessor: resized to
    width × height), as a ComfyUI IMAGE [1, H, W, 3] in 0..1 for a VAE Encode."""
    pixels = part("VideoProcessor")(vae_scale_factor=8).preprocess(frame, height=height, width=width)
    return ((pixels.float() + 1) / 2).permute(0, 2, 3, 1).clamp(0, 1)


def posterior_sample(moments: torch.Tensor, seed: int) -> torch.Tensor:
    """The VAE posterior (the encoder's mean and log-variance, `moments` [B, 2C, …]) sampled as
    ConsisIDPipeline samples the first frame's: diffusers' own distribution, from a CPU generator
    seeded with `seed`. It is that generator's first draw; the initial noise (`reference_noise`)
    comes after it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return part("DiagonalGaussianDistribution")(moments).sample(generator)


def reference_noise(seed: int, channels: int, frames: int, height: int, width: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial noise ConsisIDPipeline draws for `torch.Generator('cpu').manual_seed(seed)`,
    as [1, channels, latent frames, h, w] (ComfyUI's layout).

    The pipeline first samples the first frame's VAE posterior from the same generator
    (one [1, channels, 1, h, w] draw), then the noise as [1, frames, channels, h, w]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.randn((1, channels, 1, height, width), generator=generator, dtype=dtype)
    return torch.randn((1, frames, channels, height, width), generator=generator, dtype=dtype).permute(0, 2, 1, 3, 4)


class ReferenceStepNoise:
    """The fresh noise ConsisIDPipeline's `dpm` scheduler (CogVideoXDPMScheduler, a DPM-Solver++(2M)
    SDE) adds at each step for a seed, as [1, channels, latent frames, h, w].

    The generator has drawn the first frame's posterior and the initial noise (`reference_noise`);
    the scheduler then draws one noise at its first step and two at each later one, using the
    second (the first belongs to a first-order step it discards)."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        batch, channels, frames, height, width = shape
        self._shape = (batch, frames, channels, height, width)
        self._dtype = dtype
        self._generator = torch.Generator("cpu").manual_seed(seed)
        torch.randn((1, channels, 1, height, width), generator=self._generator, dtype=dtype)
        torch.randn(self._shape, generator=self._generator, dtype=dtype)
        self._steps = 0

    def __call__(self) -> torch.Tensor:
        draws = 1 if self._steps == 0 else 2
        self._steps += 1
        for _ in range(draws):
            noise = torch.randn(self._shape, generator=self._generator, dtype=self._dtype)
        return noise.permute(0, 2, 1, 3, 4)


def dynamic_guidance(scale: float, timestep: float, steps: int) -> float:
    """The reference's dynamic CFG (CogVideoX's cosine schedule), as its pipeline computes it:
    from the timestep t (999 … 0) and the step count."""
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - timestep) / steps) ** 5.0)) / 2)
