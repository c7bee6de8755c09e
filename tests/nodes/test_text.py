"""nodes/text.py: ConsisID Text Encode needs a model with its own T5 or a CLIP, else it says which
to connect (encoding with a ComfyUI CLIP: tests/comfy_clip_parity.py)."""

import pytest

from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

def test_text_encode_needs_a_model_or_a_clip():
    from consisid_pack.consisid_core.errors import ConsisIDError

    with pytest.raises(ConsisIDError, match="connect a ConsisID model .* or a CLIP"):
        NODE_CLASS_MAPPINGS["ConsisIDTextEncode"]().encode("x", "")
