"""nodes/native/step_cache.py: ConsisID Step Cache's declared threshold and its refusal outside ComfyUI
(the cache on the native MODEL against the wrapper's TeaCache: test_native_features.py)."""

import math
import re

import pytest

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402

STEP_CACHE = NODE_CLASS_MAPPINGS["ConsisIDStepCache"]


def test_the_threshold_is_declared_and_checked():
    declared = STEP_CACHE.INPUT_TYPES()["required"]["threshold"][1]
    assert declared["default"] == 0.1 and declared["min"] == 0 and declared["tooltip"]
    assert STEP_CACHE.VALIDATE_INPUTS(threshold=0.0) is True and STEP_CACHE.VALIDATE_INPUTS(threshold=declared["max"]) is True


@pytest.mark.parametrize("threshold", [-0.1, math.nan, math.inf, 1e9, "0.1"])
def test_a_threshold_outside_the_declared_is_refused_naming_it(threshold):
    message = STEP_CACHE.VALIDATE_INPUTS(threshold=threshold)
    assert message.startswith(f"threshold {threshold} must be a number from 0")


def test_outside_comfyui_it_says_it_needs_comfyuis_cogvideox():
    assert_refused(lambda: STEP_CACHE().patch(None, 0.1), "^" + re.escape(comfy_parts.UNAVAILABLE),
                   comfy_parts.fence.ComfyApiError)
