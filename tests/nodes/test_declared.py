"""nodes/declared.py: every node declared as ComfyUI's loader expects (ids, category, tooltips,
outputs), and the declared bounds `declared_error` checks for the inputs ComfyUI no longer checks."""

import inspect
import logging
import math
import re

import pytest
import torch

from refusals import assert_refused
from workflow_tools import import_pack

pack = import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError, FaceError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from consisid_pack.nodes.declared import FIRST_FRAME_FIX, declared_error, first_image, image_batch  # noqa: E402

EXPECTED = {
    "ConsisIDFaceModelsLoader", "ConsisIDFaceEmbed", "ConsisIDSaveIdentity", "ConsisIDLoadIdentity",
    "ConsisIDModelLoader", "ConsisIDTextEncode", "ConsisIDSampler", "ConsisIDPerformance", "ConsisIDVAEDecode",
    "ConsisIDIdentityScore", "ConsisIDExtend", "ConsisIDLoRA",
    "ConsisIDNativeModelLoader", "ConsisIDFaceModules", "ConsisIDTextConditioning", "ConsisIDIdentityConditioning",
    "ConsisIDNoise", "ConsisIDDPMSampler", "ConsisIDDynamicCFG", "ConsisIDNativeLoRA", "ConsisIDNativeVAEDecode",
    "ConsisIDStepCache", "ConsisIDSeed", "ConsisIDAppendSegment",
}


def test_the_pack_registers_nothing_outside_comfyui():
    assert pack.NODE_CLASS_MAPPINGS == {}


def test_every_node_is_declared_as_comfyui_expects(home):
    assert set(NODE_CLASS_MAPPINGS) == EXPECTED == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name.startswith("ConsisID")
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == cls.DISPLAY_NAME and cls.DISPLAY_NAME.startswith("ConsisID ")
        assert cls.CATEGORY == "ConsisID"
        assert cls.DESCRIPTION.strip()
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
        inputs = {}
        for group in spec.values():
            for input_name, declaration in group.items():
                kind, options = declaration
                assert isinstance(kind, (str, list)), (name, input_name)
                assert options.get("tooltip"), (name, input_name)
                if isinstance(kind, list) and "default" in options:
                    assert options["default"] in kind, (name, input_name)
                inputs[input_name] = declaration
        function = getattr(cls, cls.FUNCTION)
        params = inspect.signature(function).parameters
        assert set(params) - {"self"} == set(inputs), name
        assert isinstance(cls.RETURN_TYPES, tuple)
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (name, attr)
        if hasattr(cls, "VALIDATE_INPUTS"):
            assert set(inspect.signature(cls.VALIDATE_INPUTS).parameters) <= set(inputs), name
        assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False), name


@pytest.mark.parametrize("values, says", [
    (dict(scheduler="euler"), "scheduler 'euler' is not one of the choices; pick one from the list"),
    (dict(steps=0), "steps 0 must be a whole number from 1 to 1000"),
    (dict(steps=2.5), "steps 2.5 must be a whole number from 1 to 1000"),
    (dict(steps=True), "steps True must be a whole number from 1 to 1000"),
    (dict(steps=10**400), "steps 1000000000"),  # a JSON integer no float holds: compared as an int, shown cut
    (dict(cfg=math.nan), "cfg nan must be a number from 0.0 to "),
    (dict(cfg=-0.5), "cfg -0.5 must be a number from 0.0 to "),
    (dict(steps=5, cfg="6"), "cfg 6 must be a number from 0.0 to "),
])
def test_declared_error_names_the_first_value_outside_the_declaration(values, says):
    sampler = NODE_CLASS_MAPPINGS["ConsisIDSampler"]
    assert declared_error(sampler, scheduler="ddim", steps=1000, cfg=2.5) is None
    assert declared_error(sampler, **values).startswith(says)


def test_an_image_input_is_rgb_or_refused_naming_the_input_and_what_to_connect():
    grey = torch.rand(2, 4, 5, 1)
    assert torch.equal(image_batch(grey, "photo", "a Load Image"), grey.expand(2, 4, 5, 3))
    rgba = torch.rand(1, 4, 5, 4)
    assert torch.equal(image_batch(rgba, "photo", "a Load Image"), rgba[..., :3])
    assert_refused(lambda: image_batch(torch.rand(4, 5, 3), "photo", "a Load Image", FaceError),
                   "^" + re.escape("the photo (float32 [4, 5, 3]) is not an IMAGE: ") + ".*; connect a Load Image$",
                   FaceError, exact=True)


def test_the_first_frame_is_the_first_image_of_a_batch_or_none(caplog):
    assert first_image(None, "start_image") is None
    batch = torch.rand(2, 4, 5, 3)
    with caplog.at_level(logging.INFO):
        picture = first_image(batch, "start_image")
    assert picture.dtype.name == "uint8" and picture.shape == (4, 5, 3)
    assert abs(picture.astype(float) / 255 - batch[0].numpy()).max() <= 1 / 255
    assert "the start_image is a batch of 2; using its first image" in caplog.text
    message = assert_refused(lambda: first_image(torch.full((1, 4, 5, 3), math.inf), "start_image"),
                             "^the start_image holds NaN or infinite pixels", ConsisIDError)
    assert message.endswith(FIRST_FRAME_FIX)
