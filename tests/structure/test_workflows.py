"""The shipped workflows (UI format): in step with their builder, and valid against the node specs."""

import copy
import json

import pytest

from workflow_tools import WORKFLOWS, all_specs, build, check, dumps, to_api

SHIPPED = sorted(p.name for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def specs():
    return all_specs()


def test_the_four_workflows_are_shipped_and_up_to_date(specs):
    built = build(specs)
    assert SHIPPED == sorted(built)
    for name, workflow in built.items():
        assert (WORKFLOWS / name).read_text() == dumps(workflow), f"run `python tests/helpers/workflow_tools.py` ({name})"


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_names_only_nodes_inputs_and_values_that_exist(specs, name):
    assert check(json.loads((WORKFLOWS / name).read_text()), specs) == []


def test_the_checker_finds_what_is_wrong(specs):
    workflow = json.loads((WORKFLOWS / "consisid_basic.json").read_text())
    broken = copy.deepcopy(workflow)
    sampler = next(n for n in broken["nodes"] if n["type"] == "ConsisIDSampler")
    sampler["widgets_values"][5] = "euler"
    sampler["widgets_values"][2] = 0
    decode = next(n for n in broken["nodes"] if n["type"] == "ConsisIDVAEDecode")
    decode["widgets_values"].pop()
    broken["nodes"].append(dict(sampler, id=99, type="ConsisIDSampler2"))
    problems = check(broken, specs)
    assert any("scheduler='euler' is not one of ['dpm', 'ddim']" in p for p in problems)
    assert any("steps=0 is outside 1..1000" in p for p in problems)
    assert any("(ConsisIDVAEDecode): 5 widget values, expected 6" in p for p in problems)
    assert any("(ConsisIDSampler2): no such node" in p for p in problems)


def _types(name: str) -> list[str]:
    return [n["type"] for n in json.loads((WORKFLOWS / name).read_text())["nodes"]]


def test_each_workflow_is_the_graph_the_readme_describes(specs):
    basic = _types("consisid_basic.json")
    assert basic[:3] == ["LoadImage", "ConsisIDFaceModelsLoader", "ConsisIDFaceEmbed"]
    assert basic[-4:] == ["ConsisIDSampler", "ConsisIDVAEDecode", "CreateVideo", "SaveVideo"]
    assert "CLIPLoader" in _types("consisid_core_t5.json")
    upscale = _types("consisid_upscale_interpolate.json")
    assert upscale.index("ImageUpscaleWithModel") < upscale.index("RIFE VFI") < upscale.index("CreateVideo")
    reuse = _types("consisid_reuse_identity.json")
    assert "ConsisIDLoadIdentity" in reuse and not {"ConsisIDFaceModelsLoader", "ConsisIDFaceEmbed"} & set(reuse)

    api = to_api(json.loads((WORKFLOWS / "consisid_upscale_interpolate.json").read_text()), specs)
    by_type = {node["class_type"]: node["inputs"] for node in api.values()}
    assert by_type["CreateVideo"]["fps"] == 16.0
    assert by_type["SaveVideo"]["format"] == "mp4"
    assert by_type["ConsisIDSampler"]["seed"] == 42 and by_type["ConsisIDSampler"]["steps"] == 50
    clip = to_api(json.loads((WORKFLOWS / "consisid_core_t5.json").read_text()), specs)
    clip_loader = next(n["inputs"] for n in clip.values() if n["class_type"] == "CLIPLoader")
    assert clip_loader["type"] == "sd3"


def test_a_vae_decode_saved_with_one_overlap_still_loads(specs):
    """Workflows saved before VAE Decode had two overlaps hold five values: the old overlap lands
    in overlap_height (where it stood) and overlap_width, added last, takes its default."""
    old = {"nodes": [{"id": 1, "type": "ConsisIDVAEDecode", "inputs": [], "widgets_values": [True, 240, 360, 48, False]}],
           "links": []}
    (node,) = to_api(old, specs).values()
    assert node["inputs"] == {"tiling": True, "tile_height": 240, "tile_width": 360, "overlap_height": 48,
                              "slicing": False, "overlap_width": 72}
