"""nodes/faces.py: ConsisID Face Models Loader and Face Embed refuse an unknown face encoder and an
image that is not a photo, in one line."""

import math

import torch

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import FaceError  # noqa: E402
from consisid_pack.consisid_core.files import shown  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

FACE_LOADER, FACE_EMBED = NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"], NODE_CLASS_MAPPINGS["ConsisIDFaceEmbed"]


def test_face_models_loader_refuses_an_unknown_face_encoder(home):
    assert FACE_LOADER.INPUT_TYPES()["required"]["face_encoder"][0] == ["tiny"]
    for name in ("nope", "../tiny", "tiny/../../tiny", "tiny\n"):
        message = assert_refused(lambda: FACE_LOADER().load(name, "cpu", "cpu"), error=FileNotFoundError)
        assert message == (
            f"face encoder '{shown(name)}' is not in models/consisid; put the ConsisID checkpoint "
            "(with its face_encoder/ folder) there and refresh"
        )


def test_face_embed_refuses_an_empty_or_broken_image(home):
    (face_models,) = FACE_LOADER().load("tiny", "cpu", "cpu")
    message = assert_refused(lambda: FACE_EMBED().embed(torch.zeros(0, 64, 64, 3), face_models, -1), error=FaceError)
    assert message == ("the image input (float32 [0, 64, 64, 3]) is not an IMAGE: a float batch [images, height, "
                       "width, channels] with at least one pixel and 1 to 4 channels; connect a photo (Load Image)")
    message = assert_refused(lambda: FACE_EMBED().embed(torch.zeros(64, 64, 3), face_models, -1), error=FaceError)
    assert message.startswith("the image input (float32 [64, 64, 3]) is not an IMAGE")
    image = torch.rand(1, 32, 32, 3)
    image[0, 3, 4, 0] = math.nan
    message = assert_refused(lambda: FACE_EMBED().embed(image, face_models, -1), error=FaceError)
    assert message == "the image input holds NaN or infinite pixels; connect a photo (Load Image)"
    message = assert_refused(lambda: FACE_EMBED().embed(torch.zeros(1, 1, 1, 3), face_models, -1), error=FaceError)  # (the tiny detector's answer)
    assert message.startswith("no face found in the input image (1×1 after resizing): use a clearer")
