"""nodes/declared.py: every node declared as ComfyUI's loader expects (ids, category, tooltips,
outputs), and the declared bounds `declared_error` checks for the inputs ComfyUI no longer checks."""

import inspect

from workflow_tools import import_pack

pack = import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

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
