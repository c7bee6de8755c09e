"""nodes/long_video.py: ConsisID Extend's declarations and its refusals of sizes and previous frames
that cannot continue, before any work (whole extended runs: test_segments.py)."""

import re

import pytest
import torch

from node_tools import parts_called
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

EXTEND = NODE_CLASS_MAPPINGS["ConsisIDExtend"]


def test_extend_takes_the_samplers_inputs_and_a_segment_of_five_frames_or_more():
    required = EXTEND.INPUT_TYPES()["required"]
    sampler = NODE_CLASS_MAPPINGS["ConsisIDSampler"].INPUT_TYPES()["required"]
    assert {"previous", "colour_match"} <= set(required) and set(sampler) - {"start_image"} <= set(required)
    assert required["length"][1]["min"] == 5 and required["seed"][1]["default"] == 43
    assert EXTEND.VALIDATE_INPUTS(length=49, width=720, height=480) is True
    assert EXTEND.VALIDATE_INPUTS(length=1, width=720, height=480) == "length 1 must be a whole number from 5 to 1025"
    assert EXTEND.VALIDATE_INPUTS(length=50, width=720, height=480).startswith("length 50 must be 4·k + 1")


def extend(model, identity, text, previous, **changes):
    args = dict(model=model, identity=identity, text=text, previous=previous, seed=43, steps=1, cfg=6.0,
                dynamic_cfg=False, scheduler="dpm", length=9, width=96, height=64, identity_strength=1.0,
                colour_match=False)
    return EXTEND().extend(**{**args, **changes})


@pytest.mark.parametrize("previous, changes, says", [
    (torch.rand(9, 64, 80, 3), {}, "the previous frames are 80×64, this segment is 96×64: every segment of a video "
                                   "has one size; set width and height to the previous frames'"),
    (torch.rand(9, 64, 96), {}, "the previous frames (float32 [9, 64, 96]) is not an IMAGE"),
    (torch.rand(9, 64, 96, 3), {"length": 1}, "segments of 1 frame add nothing to the one before (their one frame is its last)"),
])
def test_extend_refuses_what_cannot_continue_before_any_work(tiny_model, identity, text, previous, changes, says):
    with parts_called(tiny_model) as calls:
        message = assert_refused(lambda: extend(tiny_model, identity, text, previous, **changes), re.escape(says),
                                 ConsisIDError)
    assert calls == [], message
