"""nodes/text.py: ConsisID Text Encode with the checkpoint's own T5, a CLIP's tokens cut and padded to
226 as diffusers' tokenizer, and what it needs (encoding with a real ComfyUI CLIP: comfy_clip_parity.py)."""

import logging
import re

import pytest
import torch

from refusals import assert_refused

from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from consisid_pack.nodes.text import _tokens_226  # noqa: E402


def test_text_encode_needs_a_model_or_a_clip():
    with pytest.raises(ConsisIDError, match="connect a ConsisID model .* or a CLIP"):
        NODE_CLASS_MAPPINGS["ConsisIDTextEncode"]().encode("x", "")


@pytest.mark.slow
def test_the_checkpoints_own_t5_gives_the_cores_embeddings(home, tiny_dir):
    from consisid_core import Checkpoint
    from consisid_core.text import encode_with_checkpoint

    (model,) = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    (text,) = NODE_CLASS_MAPPINGS["ConsisIDTextEncode"]().encode("an astronaut smiling", "blurry", model=model)
    expected = encode_with_checkpoint(Checkpoint.open(tiny_dir), torch.float32, "an astronaut smiling", "blurry")
    assert text.positive.shape == (1, 226, model.config.text_embed_dim)
    assert torch.equal(text.positive, expected.positive) and torch.equal(text.negative, expected.negative)
    assert not torch.equal(text.positive, text.negative)


class Clip:
    """What a ComfyUI CLIP's tokenize answers: `count` T5-XXL tokens (ids 5, 6, ...) then T5's end (1)."""

    def __init__(self, count: int, t5: bool = True):
        self.count, self.t5 = count, t5

    def tokenize(self, text, **options):
        pairs = [(5 + k, 1.0) for k in range(self.count)] + [(1, 1.0)]
        return {"t5xxl": [pairs]} if self.t5 else {"l": [pairs], "g": [pairs]}


def test_a_clips_tokens_are_padded_to_226_as_diffusers_does():
    padded = _tokens_226(Clip(3), "a face")["t5xxl"]
    assert padded == [[(5, 1.0), (6, 1.0), (7, 1.0), (1, 1.0)] + [(0, 1.0)] * 222]


def test_a_long_prompt_keeps_its_first_225_tokens_and_the_log_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        (padded,) = _tokens_226(Clip(300), "a long prompt")["t5xxl"]
    assert [p[0] for p in padded] == list(range(5, 230)) + [1]
    assert "the prompt is 300 tokens long; T5 sees the first 225, as in the reference" in caplog.text


def test_a_clip_without_t5_is_refused_naming_what_it_has():
    assert_refused(lambda: _tokens_226(Clip(3, t5=False), "a face"), "^" + re.escape(
        "this CLIP has no T5-XXL (it has l, g): load a t5xxl file with CLIPLoader, type sd3"), ConsisIDError)
