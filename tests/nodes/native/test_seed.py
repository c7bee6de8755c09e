"""nodes/native/seed.py: ConsisID Seed's declared refusals and, in-process in ComfyUI with native
CogVideoX, its three outputs for one seed (their videos against the reference: test_native_features.py)."""

import re

import pytest
import torch

from native_tools import NEEDS_NATIVE, import_comfyui
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402

SEED = NODE_CLASS_MAPPINGS["ConsisIDSeed"]


@pytest.mark.parametrize("seed", [-1, 2**64, 0.5, True, "7"])
def test_a_seed_outside_the_declared_is_refused_naming_it(seed):
    assert SEED.VALIDATE_INPUTS(seed=0) is True and SEED.VALIDATE_INPUTS(seed=2**64 - 1) is True
    assert SEED.VALIDATE_INPUTS(seed=seed) == f"seed {seed} must be a whole number from 0 to {2**64 - 1}"


def test_outside_comfyui_it_says_it_needs_comfyuis_cogvideox():
    assert_refused(lambda: SEED().get(42), "^" + re.escape(comfy_parts.UNAVAILABLE), comfy_parts.fence.ComfyApiError)


@pytest.mark.comfyui
@pytest.mark.slow  # imports ComfyUI in-process: seconds
@NEEDS_NATIVE
def test_one_seed_gives_the_reference_noise_the_reference_sampler_and_itself():
    import_comfyui()
    import comfy.samplers

    from consisid_pack.nodes import NODE_CLASS_MAPPINGS as inside

    noise, sampler, seed = inside["ConsisIDSeed"]().get(42)
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    (alone,) = inside["ConsisIDNoise"]().get_noise(42)
    assert seed == 42 and torch.equal(noise.generate_noise(latent), alone.generate_noise(latent))
    assert isinstance(sampler, comfy.samplers.KSAMPLER)
    assert type(sampler) is type(inside["ConsisIDDPMSampler"]().get_sampler(42)[0])
