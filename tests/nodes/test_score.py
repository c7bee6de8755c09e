"""nodes/score.py: ConsisID Identity Score's declarations, its refusal of frames that are not an IMAGE,
and its outputs on frames without a face (scores against the official protocol: test_score.py)."""

import re

import pytest
import torch

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

SCORE = NODE_CLASS_MAPPINGS["ConsisIDIdentityScore"]


@pytest.fixture
def face_models(home):
    return NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"]().load("tiny", "cpu", "cpu")[0]


def test_outputs_match_their_declarations():
    assert SCORE.OUTPUT_NODE and SCORE.RETURN_TYPES == ("FLOAT", "STRING", "IMAGE")
    sampled = SCORE.INPUT_TYPES()["required"]["frames_sampled"][1]
    assert sampled["min"] == 1 and sampled["default"] == 16 <= sampled["max"]


@pytest.mark.slow
def test_dark_frames_have_no_face_and_score_zero(face_models, identity):
    """The tiny face models find faces wherever it is bright: black frames have none."""
    shown = SCORE().score(torch.zeros(6, 64, 64, 3), face_models, identity, 3)
    mean, text, picture = shown["result"]
    assert shown["ui"]["text"] == [text] and mean == 0
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.endswith("no face") for line in lines[1:]), text
    assert picture.dim() == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3
    assert 0 <= picture.min() and picture.max() <= 1 and picture.std() > 0


@pytest.mark.parametrize("frames, says", [
    (torch.zeros(0, 64, 64, 3), "the frames input (float32 [0, 64, 64, 3]) is not an IMAGE"),
    (torch.zeros(64, 64, 3), "the frames input (float32 [64, 64, 3]) is not an IMAGE"),
    (torch.full((2, 64, 64, 3), float("nan")), "the frames input holds NaN or infinite pixels"),
])
def test_frames_that_are_not_an_image_are_refused_in_one_line(identity, frames, says):
    """Refused before the face models are used (none is given)."""
    message = assert_refused(lambda: SCORE().score(frames, None, identity, 3), "^" + re.escape(says), ConsisIDError)
    assert "the frames of a video (VAE Decode's)" in message
