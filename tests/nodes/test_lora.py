"""nodes/lora.py: ConsisID LoRA's list and refusals, and that it stacks a LoRA on a new model, the one
it was given unchanged (merging and its frames: test_lora.py, in ComfyUI: test_comfyui_lora.py)."""

import re

import pytest
import torch

from native_tools import write_lora
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

LORA = NODE_CLASS_MAPPINGS["ConsisIDLoRA"]
LAYERS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"]


@pytest.fixture
def loras(home, tiny_model):
    """models/loras with one LoRA of the tiny transformer, style.safetensors; the tiny model."""
    write_lora(home / "models" / "loras" / "style.safetensors", tiny_model.transformer, LAYERS, seed=1)
    return tiny_model


def test_the_list_is_models_loras_and_other_names_are_refused(loras):
    assert LORA.INPUT_TYPES()["required"]["lora_name"][0] == ["style.safetensors"]
    assert LORA.VALIDATE_INPUTS(lora_name="style.safetensors", strength=-2.5) is True
    assert LORA.VALIDATE_INPUTS(lora_name="gone.safetensors", strength=1.0) == (
        "lora_name 'gone.safetensors' is not one of the choices; pick one from the list (refresh it after adding files)")
    assert LORA.VALIDATE_INPUTS(lora_name="style.safetensors", strength=float("nan")).startswith(
        "strength nan must be a number from -")


def test_apply_stacks_the_lora_on_a_new_model_and_leaves_the_given_one(loras):
    before = {k: v.clone() for k, v in loras.transformer.state_dict().items()}
    (styled,) = LORA().apply(loras, "style.safetensors", 0.5)
    (twice,) = LORA().apply(styled, "style.safetensors", -1.0)
    assert loras.loras == () and [s for _, s in styled.loras] == [0.5] and [s for _, s in twice.loras] == [0.5, -1.0]
    assert sorted(styled.loras[0][0].layers) == LAYERS
    assert twice.transformer is loras.transformer  # shared, merged only while a run uses it
    after = loras.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_refuses_a_name_outside_models_loras_and_a_lora_of_other_layers(loras, home):
    message = assert_refused(lambda: LORA().apply(loras, "../style.safetensors", 1.0),
                             re.escape("'../style.safetensors' is not a file name inside the models/loras folder"),
                             ConsisIDError, unchanged=home)
    assert message.startswith("'../style.safetensors'")
    write_lora(home / "models" / "loras" / "other.safetensors", torch.nn.ModuleDict({"x": torch.nn.Linear(3, 5)}),
               ["x"], seed=2)
    assert_refused(lambda: LORA().apply(loras, "other.safetensors", 1.0),
                   r"^LoRA 'other.safetensors': none of its 1 layers is in this ConsisID transformer .* use a LoRA "
                   "trained for ConsisID", ConsisIDError)
