"""nodes/renamed.py: a prompt with the inputs' old names (as queued before they took core ComfyUI's
names) gets the new ones before ComfyUI validates it; the nodes declare only the new names."""

import copy
import logging

import pytest

from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from consisid_pack.nodes.renamed import RENAMED, _on_prompt, old_names_renamed  # noqa: E402

SAMPLER = {"seed": 42, "steps": 50, "guidance": 6.5, "frames": 9, "image": ["7", 0], "model": ["1", 0]}


@pytest.mark.parametrize("node", sorted(RENAMED))
def test_each_node_declares_the_new_names_and_not_the_old(node):
    spec = NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
    declared = set(spec["required"]) | set(spec.get("optional", {}))
    assert set(RENAMED[node].values()) <= declared and not set(RENAMED[node]) & declared


def test_old_names_get_the_new_ones_and_nothing_else_changes():
    prompt = {"3": {"class_type": "ConsisIDSampler", "inputs": dict(SAMPLER)},
              "4": {"class_type": "KSampler", "inputs": {"cfg": 8.0, "image": ["7", 0]}},
              "5": {"class_type": "ConsisIDExtend", "inputs": {"cfg": 5.0, "length": 13, "seed": 43}},
              "6": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["1", 0], "face_modules": "a_face.safetensors"}}}
    untouched = copy.deepcopy({k: prompt[k] for k in ("4", "5")})
    said = old_names_renamed(prompt)
    assert prompt["3"]["inputs"] == {"seed": 42, "steps": 50, "cfg": 6.5, "length": 9, "start_image": ["7", 0],
                                     "model": ["1", 0]}
    assert prompt["6"]["inputs"] == {"model": ["1", 0], "face_layers": "a_face.safetensors"}
    assert {k: prompt[k] for k in ("4", "5")} == untouched
    assert said == ["ConsisID: node 3 (ConsisIDSampler) uses old input names, taken as the new ones (guidance -> cfg, "
                    "frames -> length, image -> start_image); save the workflow again to store the new names",
                    "ConsisID: node 6 (ConsisIDFaceModules) uses old input names, taken as the new ones (face_modules -> "
                    "face_layers); save the workflow again to store the new names"]


@pytest.mark.parametrize(
    "old, new, kept",
    [
        (7.0, 6.0, 6.0),  # both plain values: the new name's
        (["9", 0], 6.0, ["9", 0]),  # a socket saved under the old name beside the widget's own value: the link
        (["9", 0], ["8", 0], ["8", 0]),  # two links: the new name's
    ],
)
def test_an_old_name_beside_its_new_one(old, new, kept):
    prompt = {"3": {"class_type": "ConsisIDExtend", "inputs": {"guidance": old, "cfg": new}}}
    old_names_renamed(prompt)
    assert prompt["3"]["inputs"] == {"cfg": kept}


@pytest.mark.parametrize("prompt", [None, [], "x", {"3": None}, {"3": {"class_type": "ConsisIDSampler"}},
                                    {"3": {"class_type": "ConsisIDSampler", "inputs": ["guidance"]}}])
def test_what_is_no_prompt_is_left_to_comfyuis_validation(prompt):
    before = copy.deepcopy(prompt)
    assert old_names_renamed(prompt) == [] and prompt == before


def test_the_handler_returns_the_request_with_the_prompt_renamed_and_logs_once(caplog):
    request = {"prompt": {"3": {"class_type": "ConsisIDSampler", "inputs": dict(SAMPLER)}}, "client_id": "x"}
    with caplog.at_level(logging.WARNING):
        assert _on_prompt(request) is request
    assert "guidance" not in request["prompt"]["3"]["inputs"] and request["client_id"] == "x"
    assert [r.getMessage() for r in caplog.records if "old input names" in r.getMessage()] == old_names_renamed(
        {"3": {"class_type": "ConsisIDSampler", "inputs": dict(SAMPLER)}})
    assert _on_prompt({"number": 1}) == {"number": 1}
