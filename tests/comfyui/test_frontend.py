"""The shipped workflows in ComfyUI's real web frontend (the comfyui-frontend-package its server
serves), driven in headless Chromium: skipped unless COMFYUI_DIR names a ComfyUI source folder and
both the `playwright` package and a Chromium (on PATH, or $CHROMIUM) are there.

    COMFYUI_DIR=~/ComfyUI ~/comfy-venv/bin/python -m pytest tests/comfyui/test_frontend.py

Each workflow is opened as a person opens it (Workflow > Open, picking the file). Checked: which
node types the frontend finds missing (its "Some Nodes Are Missing" dialog and the graph), that it
raised no validation warnings, fixed no links and threw nothing, that every widget value landed in
the widget the builder meant it for, and that the prompt the frontend would queue is the one the
other tests send to /prompt. tests/helpers/frontend_tools.py has the machinery and writes the README
pictures.
"""

import json
import os

import pytest

from workflow_tools import SNAPSHOT, WORKFLOWS, import_pack, to_api, widgets

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from frontend_tools import chromium_path, frontend, prepare_base, snapshot_node_defs  # noqa: E402
from comfy_server import OLD_NAMES_WORKFLOW, running  # noqa: E402

if chromium_path() is None:
    pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM to one)", allow_module_level=True)

SHIPPED = sorted(p.name for p in WORKFLOWS.glob("*.json"))
MISSING = {  # ComfyUI-Frame-Interpolation, not installed
    "consisid_upscale_interpolate.json": ["RIFE VFI"], "consisid_long_video.json": ["RIFE VFI"],
}
EXTRA_WIDGETS = ("control_after_generate", "upload")  # frontend-only widgets after seed / image


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The server, its /object_info, and one page on its frontend."""
    base = prepare_base(tmp_path_factory.mktemp("frontend"))
    with running(base) as server, frontend(server.url) as page:
        specs = server.get("/object_info")
        yield page, specs


@pytest.fixture(scope="module")
def opened(session):
    """What the frontend made of each workflow, all opened before any test changes the page."""
    page, _ = session
    return {name: page.open_workflow(WORKFLOWS / name) for name in SHIPPED}


@pytest.mark.parametrize("name", SHIPPED)
def test_opens_with_no_missing_node_but_the_third_party_one(opened, name):
    loaded = opened[name]
    expected = MISSING.get(name, [])
    assert loaded.active_workflow == f"workflows/{name}"
    assert loaded.reported_missing == expected
    assert loaded.dialog_missing == expected
    assert loaded.graph_missing == expected
    assert loaded.missing_models == []  # every file the workflow names is in the model folders here
    if expected and not loaded.warnings_panel:  # frontend 1.27: a dialog; 1.49: its errors panel
        assert len(loaded.dialogs) == 1 and "Some Nodes Are Missing" in loaded.dialogs[0]
    else:
        assert loaded.dialogs == []
    assert loaded.toasts == []  # workflow validation and link fixing report here
    assert loaded.page_errors == []
    assert [n["type"] for n in loaded.nodes] == [n["type"] for n in _workflow(name)["nodes"]]


def _with_snapshot(specs: dict) -> dict:
    return specs | {"RIFE VFI": json.loads(SNAPSHOT.read_text())["RIFE VFI"]}


@pytest.mark.parametrize("name", SHIPPED)
def test_the_frontend_keeps_every_node_link_and_value(session, opened, name):
    """Saving right after opening gives back the file's nodes, links and widget values, and the
    defaults of widgets this ComfyUI added since the files were written (v0.33: Create Video's
    bit_depth, Save Video's nested codec settings)."""
    specs = _with_snapshot(session[1])
    workflow, saved = _workflow(name), opened[name].serialized
    assert saved["links"] == workflow["links"]
    assert [(n["id"], n["type"], n.get("widgets_values", [])) for n in saved["nodes"]] == [
        (n["id"], n["type"], [value for _, _, value in widgets(specs[n["type"]], n["widgets_values"])])
        for n in workflow["nodes"]
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_each_value_lands_in_the_widget_it_is_meant_for(session, opened, name):
    _, specs = session
    for node, shown in zip(_workflow(name)["nodes"], opened[name].nodes):
        if not shown["registered"]:
            continue
        saved = [(widget, value) for widget, value, is_saved in shown["widgets"] if is_saved]
        meant = widgets(specs[node["type"]], node["widgets_values"])
        assert [widget for widget, _ in saved if widget not in EXTRA_WIDGETS] == [n for n, extra, _ in meant if not extra]
        assert [value for _, value in saved] == [value for _, _, value in meant], node["type"]
        assert [value for _, _, value in meant][: len(node["widgets_values"])] == node["widgets_values"]
    samplers = [n for n in opened[name].nodes if n["type"] == "ConsisIDSampler"]
    if not samplers:  # the native workflows sample with core's nodes
        return
    sampler = {widget: value for widget, value, _ in samplers[0]["widgets"]}
    assert (sampler["seed"], sampler["control_after_generate"], sampler["steps"]) == (42, "fixed", 50)
    assert (sampler["cfg"], sampler["scheduler"], sampler["length"]) == (6.0, "dpm", 49)
    assert (sampler["width"], sampler["height"]) == (720, 480)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_frontend_queues_the_prompt_the_other_tests_send(session, opened, name):
    """app.graphToPrompt() against workflow_tools.to_api (what test_comfyui posts to /prompt),
    node for node; a missing node has no class to give, so it is left out of both."""
    specs = _with_snapshot(session[1])
    ours = to_api(_workflow(name), specs)
    theirs = opened[name].prompt
    known = {str(n["id"]) for n in opened[name].nodes if n["registered"]}
    assert set(theirs) == set(ours)
    assert {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in theirs.items() if i in known} == {
        i: n for i, n in ours.items() if i in known
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_no_node_covers_another_as_the_frontend_sizes_them(opened, name):
    """With the face photo in input/, LoadImage grows to show it; nothing may then overlap."""
    boxes = [(n["id"], n["pos"], n["size"]) for n in opened[name].serialized["nodes"]]
    title = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above pos
    for i, (a, (ax, ay), (aw, ah)) in enumerate(boxes):
        for b, (bx, by), (bw, bh) in boxes[i + 1:]:
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by - title or by + bh <= ay - title
            assert apart, f"nodes {a} and {b} overlap"


def test_rife_vfi_values_land_with_its_definition_registered(session, opened):
    """RIFE VFI's definition from the node-spec snapshot, added the way the frontend adds the
    server's nodes: then nothing is missing and its values land in their widgets."""
    page, specs = session
    page.register_node_defs(snapshot_node_defs())
    loaded = page.open_workflow(WORKFLOWS / "consisid_upscale_interpolate.json")
    assert loaded.reported_missing == loaded.dialog_missing == loaded.graph_missing == loaded.dialogs == []
    rife = next(n for n in loaded.nodes if n["type"] == "RIFE VFI")
    assert [(widget, value) for widget, value, _ in rife["widgets"]] == [
        ("ckpt_name", "rife47.pth"), ("clear_cache_after_n_frames", 10), ("multiplier", 2),
        ("fast_mode", True), ("ensemble", True), ("scale_factor", 1.0),
    ]
    ours = to_api(_workflow("consisid_upscale_interpolate.json"), _with_snapshot(specs))
    assert {"class_type": loaded.prompt["10"]["class_type"], "inputs": loaded.prompt["10"]["inputs"]} == ours["10"]


def test_a_workflow_saved_with_the_old_input_names_queues_as_the_shipped_one(session):
    """consisid_reuse_identity.json as saved before ConsisID Sampler's inputs took core's names
    (its first-frame socket still `image`): it opens with nothing reported, its widget values
    (positional) land in the renamed widgets, and the prompt the frontend queues is the shipped
    workflow's once the pack's on-prompt handler has renamed what the file still names the old way."""
    import_pack()
    from consisid_pack.nodes.renamed import old_names_renamed

    page, specs = session
    loaded = page.open_workflow(OLD_NAMES_WORKFLOW)
    assert loaded.reported_missing == loaded.dialog_missing == loaded.graph_missing == loaded.dialogs == []
    assert loaded.toasts == [] and loaded.page_errors == []
    (sampler,) = [n for n in loaded.nodes if n["type"] == "ConsisIDSampler"]
    shown = {widget: value for widget, value, _ in sampler["widgets"]}
    assert (shown["cfg"], shown["length"], shown["seed"]) == (6.0, 49, 42)
    prompt = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in loaded.prompt.items()}
    old_names_renamed(prompt)
    assert prompt == to_api(_workflow("consisid_reuse_identity.json"), _with_snapshot(specs))
