"""ConsisID Seed: the reference's noise, its dpm sampler and the first frame's seed from one seed."""

from __future__ import annotations

from ..declared import declared_error, seed_input
from . import comfy_parts


class ConsisIDSeed:
    DISPLAY_NAME = "ConsisID Seed"
    DESCRIPTION = (
        "One seed for the reference's video on the native path: the NOISE (ConsisID Noise's) and the SAMPLER (ConsisID "
        "DPM Sampler's) for SamplerCustomAdvanced, and the seed to connect to ConsisID Identity Conditioning's "
        "first_frame_seed. With the simple scheduler this gives the command line's and ConsisID Sampler's video "
        "for that seed. For a core sampler, use ConsisID Noise (noise only)."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "get"
    RETURN_TYPES = ("NOISE", "SAMPLER", "INT")
    RETURN_NAMES = ("noise", "sampler", "seed")
    OUTPUT_TOOLTIPS = (
        "Connect to SamplerCustomAdvanced's noise input.",
        "The reference's dpm (CogVideoXDPMScheduler) for this seed: connect to SamplerCustomAdvanced's sampler input.",
        "Connect to ConsisID Identity Conditioning's first_frame_seed: the first frame sampled as the reference "
        "samples it for this seed.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": seed_input("The run's seed: diffusers' CPU generator with this seed, as the "
                                                "command line's --seed.", control_after_generate=True)}}

    @classmethod
    def VALIDATE_INPUTS(cls, seed: int):
        return declared_error(cls, seed=seed) or True

    def get(self, seed: int):
        comfy_parts.require()
        return comfy_parts.ReferenceNoise(seed), comfy_parts.reference_dpm_sampler(seed), seed


NODES = {"ConsisIDSeed": ConsisIDSeed}
