"""Long videos in a graph: ConsisID Extend continues a video by one segment from its last frame."""

from __future__ import annotations

import torch

from ..consisid_core.errors import ConsisIDError
from ..consisid_core.segments import ColourReference, check_segments
from .declared import declared_error, image_batch, seed_input
from .sampling import ConsisIDSampler, check_size
from .vae import ConsisIDVAEDecode


class ConsisIDExtend:
    DISPLAY_NAME = "ConsisID Extend"
    DESCRIPTION = (
        "Continues a video by one segment: ConsisID generates a new segment whose first frame is the last of "
        "the previous frames, with the identity applied afresh, then decodes it. Chain Extend nodes (video → "
        "previous) after a Sampler and VAE Decode for a long video. The command line's --segments gives "
        "segment k of a run with seed S the seed S + k − 1: the same seeds here give the same frames."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "extend"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("new_frames", "video")
    OUTPUT_TOOLTIPS = (
        "The new segment without its first frame (the previous frames' last, which it starts from): frames − 1.",
        "The previous frames followed by the new ones: the whole video so far. Connect it to the next Extend's "
        "previous, or to Create Video.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        sampler = ConsisIDSampler.INPUT_TYPES()
        common = sampler["required"]
        required = {name: common[name] for name in ("model", "identity", "text")}
        required["previous"] = ("IMAGE", {
            "tooltip": "The video so far (VAE Decode's frames, or the previous Extend's video): the new segment "
                       "starts from its last frame.",
        })
        required["seed"] = seed_input("This segment's seed. The command line's --segments uses seed + k − 1 for "
                                      "segment k (42, 43, 44, … for seed 42).", default=43)
        for name in ("steps", "cfg", "dynamic_cfg", "scheduler"):
            required[name] = common[name]
        length_kind, length_options = common["length"]
        required["length"] = (length_kind, length_options | {
            "min": 5, "tooltip": "Frames of the new segment, 4·k + 1, its first being the previous last (49 as trained).",
        })
        for name in ("width", "height", "identity_strength"):
            required[name] = common[name]
        required["colour_match"] = ("BOOLEAN", {
            "default": False,
            "tooltip": "Give the new segment the colour (CIELAB mean and spread per channel) of the first `length` "
                       "previous frames, the first segment in a chain: stops the slow colour drift of chained segments.",
        })
        optional = {name: sampler["optional"][name] for name in ("performance", "allow_oversize")}
        return {"required": required, "optional": optional}

    @classmethod
    def VALIDATE_INPUTS(cls, length: int, width: int, height: int):
        return declared_error(cls, length=length, width=width, height=height) or check_size(length, width, height)

    def extend(self, model, identity, text, previous, seed, steps, cfg, dynamic_cfg, scheduler, length, width,
               height, identity_strength, colour_match, performance=None, allow_oversize=False):
        previous = image_batch(previous, "previous frames", "VAE Decode's frames or the previous Extend's video")
        if tuple(previous.shape[1:3]) != (height, width):
            raise ConsisIDError(
                f"the previous frames are {previous.shape[2]}×{previous.shape[1]}, this segment is {width}×{height}: "
                "every segment of a video has one size; set width and height to the previous frames' (extend "
                "before upscaling)"
            )
        check_segments(2, length)
        (latent,) = ConsisIDSampler().sample(
            model, identity, text, seed, steps, cfg, dynamic_cfg, scheduler, length, width, height,
            identity_strength, start_image=previous[-1:], performance=performance, allow_oversize=allow_oversize,
        )
        (video,) = ConsisIDVAEDecode().decode(model, latent, tiling=False)
        if colour_match:
            video = ColourReference.of(previous[:length]).match(video)
        new = video[1:].to(previous.device, previous.dtype)
        return new, torch.cat([previous, new])


NODES = {"ConsisIDExtend": ConsisIDExtend}
