"""nodes/fence.py outside ComfyUI: features off and refused in one line, the assumptions' order, `takes`,
`castable`, `twin`, `t5_pairs` (each internal broken in a real ComfyUI: test_comfyui_fence.py, comfy_fence.py)."""

import re

import pytest
import torch

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import fence  # noqa: E402


def test_outside_comfyui_every_feature_is_off_and_refused_in_one_line():
    assert not fence.IN_COMFYUI
    found = fence.check()
    assert list(found) == [a.feature for a in fence.assumptions()] and all(v == ["ComfyUI"] for v in found.values())
    assert not fence.works("model_management")
    message = assert_refused(lambda: fence.require("lora_patches", "ConsisID LoRA's patches"),
                             "^" + re.escape("ConsisID LoRA's patches needs ComfyUI internals that this ComfyUI "),
                             fence.ComfyApiError, exact=True)
    assert "(ComfyUI): use a ComfyUI version this pack declares" in message
    assert issubclass(fence.ComfyApiError, ConsisIDError)


def test_each_feature_is_named_once_and_needs_one_checked_before_it():
    seen = set()
    for assumption in fence.assumptions():
        assert assumption.feature not in seen and (assumption.needs is None or assumption.needs in seen), assumption
        assert assumption.uses and assumption.without and callable(assumption.probe)
        seen.add(assumption.feature)


def test_takes_reads_a_signature():
    def plain(value, total, preview=None):
        pass

    def open_ended(value, **options):
        pass

    assert fence.takes(plain, "value", "preview") and fence.takes(open_ended, "value", "total")
    assert not fence.takes(plain, "node_id") and not fence.takes(None, "value") and not fence.takes(object(), "value")


def test_castable_is_a_plain_torch_layer_with_a_twin():
    class OwnForward(torch.nn.Linear):
        pass

    assert fence.castable(torch.nn.Linear(2, 3)) and fence.castable(torch.nn.GroupNorm(1, 4))
    assert not fence.castable(OwnForward(2, 3)) and not fence.castable(torch.nn.SiLU())


@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 4, bias=False), torch.nn.Conv3d(2, 3, (1, 3, 3), padding=1),
                                   torch.nn.LayerNorm(6, elementwise_affine=True), torch.nn.Embedding(9, 6)])
def test_a_twin_has_the_layers_settings_and_its_very_parameters(layer):
    """Built by the class of the same name in `operations` (here torch.nn itself, as ComfyUI's ops
    mirror it): the same parameters (not copies) and the same output."""
    built = fence.twin(layer, torch.nn)
    assert built is not layer and type(built) is type(layer)
    assert all(a is b for a, b in zip(built.parameters(), layer.parameters(), strict=True))
    x = torch.randint(0, 9, (2, 6)) if isinstance(layer, torch.nn.Embedding) else (
        torch.randn(1, 2, 3, 5, 5) if isinstance(layer, torch.nn.Conv3d) else torch.randn(2, 6))
    assert torch.equal(built(x), layer(x))


class Clip:
    """A CLIP's tokenize as ComfyUI's answers it: T5-XXL batches of (id, weight) pairs, or whatever `tokens` is."""

    def __init__(self, tokens=None, error=None):
        self.tokens, self.error, self.asked = tokens, error, []

    def tokenize(self, text, **options):
        self.asked.append((text, options))
        if self.error:
            raise self.error
        return self.tokens


def test_t5_pairs_asks_for_unweighted_padded_tokens_and_refuses_other_answers():
    clip = Clip({"t5xxl": [[(5, 1.0), (1, 1.0)], [(0, 1.0)]]})
    tokens, pairs = fence.t5_pairs(clip, "a face", 226)
    assert tokens is clip.tokens and pairs == [(5, 1.0), (1, 1.0), (0, 1.0)]
    assert clip.asked == [("a face", {"disable_weights": True, "tokenizer_options": {"t5xxl_min_length": 226}})]
    assert fence.t5_pairs(Clip({"l": [[(5, 1.0)]]}), "a face", 226)[1] is None  # a CLIP without T5-XXL
    fix = "connect the ConsisID model to Text Encode to use the checkpoint's own T5"
    for clip, says in ((Clip(error=TypeError("no options")), "CLIP tokenizes otherwise than the pack expects (TypeError)"),
                       (Clip({"t5xxl": [[("5", 1.0)]]}), "T5 tokens are not (id, weight) pairs")):
        message = assert_refused(lambda: fence.t5_pairs(clip, "a face", 226), re.escape(says), fence.ComfyApiError)
        assert message.endswith(fix)
