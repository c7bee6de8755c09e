"""Long videos on the native path: each segment a native run from the last frame of the video so far
(core Image From Batch, index -1, into ConsisID Identity Conditioning's start_image), joined here
with the wrapper's colour matching (`consisid_core.segments`)."""

from __future__ import annotations

import torch

from ...consisid_core.errors import ConsisIDError
from ...consisid_core.segments import ColourReference
from ..declared import image_batch


def append_segment(video: torch.Tensor, segment: torch.Tensor, colour_match: bool) -> torch.Tensor:
    """`video` followed by `segment` without its first frame (the video's last, which it started from);
    with `colour_match`, the segment first given the colour of the video's first len(segment) frames
    (the first segment's, in a chain of equal segments), as ConsisID Extend does."""
    video = image_batch(video, "video", "a VAE decode's frames")
    segment = image_batch(segment, "segment", "a VAE decode's frames")
    if video.shape[1:] != segment.shape[1:]:
        raise ConsisIDError(
            f"the segment's frames are {segment.shape[2]}×{segment.shape[1]}, the video's {video.shape[2]}×"
            f"{video.shape[1]}: every segment of a video has one size (join before upscaling)")
    if len(segment) < 2:
        raise ConsisIDError("a segment of 1 frame adds nothing (its one frame is the video's last): give each "
                            "segment 5 frames or more")
    if colour_match:
        segment = ColourReference.of(video[: len(segment)]).match(segment)
    return torch.cat([video, segment[1:].to(video.device, video.dtype)])


class ConsisIDAppendSegment:
    DISPLAY_NAME = "ConsisID Append Segment"
    DESCRIPTION = (
        "Joins a native long video: the video so far, then a segment generated from its last frame (core Image From "
        "Batch at index -1 into ConsisID Identity Conditioning's start_image), without that shared frame. Colour "
        "matching gives the segment the colour of the first segment, as ConsisID Extend does. Seeds 42, 43, 44, … for "
        "segments 1, 2, 3 are the command line's --segments with --seed 42."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "append"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("video",)
    OUTPUT_TOOLTIPS = ("The video so far followed by the segment's new frames: connect to the next Append Segment's "
                       "video, to Image From Batch (-1) for the next segment's first frame, or to Create Video.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("IMAGE", {"tooltip": "The video so far: the first segment's decoded frames, or the previous "
                                               "Append Segment's video."}),
                "segment": ("IMAGE", {"tooltip": "The next segment's decoded frames, generated from the video's last "
                                                 "frame (its first frame is that one)."}),
                "colour_match": ("BOOLEAN", {"default": False,
                                             "tooltip": "Give the segment the colour (CIELAB mean and spread per channel) "
                                                        "of the video's first frames: stops the slow colour drift of "
                                                        "chained segments."}),
            }
        }

    def append(self, video, segment, colour_match: bool):
        return (append_segment(video, segment, colour_match),)


NODES = {"ConsisIDAppendSegment": ConsisIDAppendSegment}
