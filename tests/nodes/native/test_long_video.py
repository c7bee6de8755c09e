"""nodes/native/long_video.py: Append Segment joins without the shared frame, colour-matched on request, and
refuses segments that cannot join (native long videos in ComfyUI: test_native_features.py)."""

import re

import pytest
import torch

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

APPEND = NODE_CLASS_MAPPINGS["ConsisIDAppendSegment"]


def frames(count: int, seed: int, height: int = 16, width: int = 24, shift: float = 0.0) -> torch.Tensor:
    return (torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed)) * 0.5 + shift).clamp(0, 1)


def test_the_segment_follows_the_video_without_the_frame_they_share():
    video, segment = frames(9, 1), frames(5, 2)
    (joined,) = APPEND().append(video, segment, False)
    assert joined.shape == (13, 16, 24, 3)
    assert torch.equal(joined[:9], video) and torch.equal(joined[9:], segment[1:])


def test_colour_match_gives_the_segment_the_colour_of_the_first_frames():
    video, segment = frames(9, 1), frames(5, 2, shift=0.4)  # the segment drifted brighter
    (plain,) = APPEND().append(video, segment, False)
    (matched,) = APPEND().append(video, segment, True)
    assert torch.equal(matched[:9], video)
    first = video[:5].mean()
    assert abs(matched[9:].mean() - first) < 0.5 * abs(plain[9:].mean() - first)


@pytest.mark.parametrize("segment, says", [
    (frames(5, 2, height=32), "the segment's frames are 24×32, the video's 24×16: every segment of a video has one size"),
    (frames(1, 2), "a segment of 1 frame adds nothing (its one frame is the video's last): give each segment 5 frames"),
    (torch.zeros(5, 16, 24), "the segment (float32 [5, 16, 24]) is not an IMAGE"),
])
def test_segments_that_cannot_join_are_refused_in_one_line(segment, says):
    assert_refused(lambda: APPEND().append(frames(9, 1), segment, True), "^" + re.escape(says), ConsisIDError)
