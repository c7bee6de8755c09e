"""The shipped workflows in ComfyUI's real web frontend, driven in headless Chromium by Playwright.

Used by tests/comfyui/test_frontend.py; run as a script it writes the README pictures,
docs/workflows/<workflow>.png, one per workflows/*.json:

    COMFYUI_DIR=~/ComfyUI ~/comfy-venv/bin/python tests/helpers/frontend_tools.py [--out DIR] [NAME.json ...]

The Python must have ComfyUI's requirements, this pack and the `playwright` package; the browser is
a system Chromium (`apt-get install chromium`; or set CHROMIUM to its path): `playwright install`
is not needed. A ComfyUI server is started by `comfy_server.running` (CPU, free loopback port,
the pack as the custom node `consisid`), the frontend it serves (comfyui-frontend-package) is
opened, and each workflow is loaded the way a person does: Workflow > Open, picking the file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comfy_server import running
from workflow_tools import (LORAS, NATIVE_FILES, NATIVE_FP8_FILES, NATIVE_LORA, NATIVE_VAE, ROOT, SNAPSHOT, THIRD_PARTY,
                            WORKFLOWS)

log = logging.getLogger("frontend_tools")

PICTURES = ROOT / "docs" / "workflows"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 900}
# The user's settings file: no first-run template browser, no minimap, canvas info or canvas
# menu over the graph, nothing restored from an earlier session, no update notices.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.Persist": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Notification.ShowVersionUpdates": False,
}
PICTURE_ZOOM = 0.75  # below 0.6 the canvas drops to low-quality drawing (no text at all)
PICTURE_MARGIN = 24  # screen pixels around the graph
PICTURE_MAX_BYTES = 400_000


def chromium_path() -> str | None:
    """The Chromium to drive: $CHROMIUM, else one on PATH."""
    if os.environ.get("CHROMIUM"):
        found = shutil.which(os.environ["CHROMIUM"])
        if found is None:
            log.warning("CHROMIUM=%s is not an executable", os.environ["CHROMIUM"])
        return found
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


NAMED_FILES = {
    "models/loras": [name for name, _ in LORAS] + [NATIVE_LORA],
    "models/diffusion_models": list(NATIVE_FILES) + list(NATIVE_FP8_FILES),
    "models/vae": [NATIVE_VAE],
    "models/text_encoders": ["t5xxl_fp16.safetensors"],
    "models/upscale_models": ["RealESRGAN_x2.pth"],
    "input": ["identity.safetensors"],
}
"""The files the shipped workflows name, as empty stand-ins (the frontend only lists them), so that
it finds each where the README says it goes."""


def prepare_base(base: Path, face: bool = True) -> Path:
    """A ComfyUI base folder for test_comfyui.Server: the pack as custom node `consisid`, the
    frontend settings above, the files the workflows name (`NAMED_FILES`), and (face=True) the
    photo LoadImage names, for its preview."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "consisid"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for folder in ("input", "output", "user/default"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS, indent=2))
    for folder, names in NAMED_FILES.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / folder / name).touch()
    if face:
        try:
            from PIL import Image
            from skimage import data

            Image.fromarray(data.astronaut()).save(base / "input" / "consisid_face.png")
        except ImportError:
            log.info("scikit-image is not installed: LoadImage shows no preview")
    return base


def snapshot_node_defs() -> dict:
    """Third-party nodes' definitions (tests/data/comfyui_node_specs.json) completed into the
    /object_info entries their packs would serve."""
    specs = json.loads(SNAPSHOT.read_text())
    defs = {}
    for name, pack in THIRD_PARTY.items():
        spec = dict(specs[name])
        spec.setdefault("name", name)
        spec.setdefault("display_name", name)
        spec.setdefault("description", "")
        spec.setdefault("category", pack)
        spec.setdefault("output_node", False)
        spec.setdefault("output_is_list", [False] * len(spec["output"]))
        spec.setdefault("python_module", f"custom_nodes.{pack}")
        defs[name] = spec
    return defs


@dataclass
class Loaded:
    """What the frontend showed after opening one workflow."""

    name: str
    active_workflow: str | None  # the open tab's path: workflows/<name>
    reported_missing: list[str]  # the missing node types loadGraphData hands to extensions
    # the missing node types the frontend shows the user: its "Some Nodes Are Missing" dialog
    # (frontend 1.27), or the workflow's pending warnings its errors panel lists (1.49)
    dialog_missing: list[str]
    missing_models: list[str]  # model files the frontend warns are missing (1.49; none in 1.27)
    warnings_panel: bool  # whether the frontend lists what is missing in its errors panel (1.49)
    graph_missing: list[str]  # graph nodes whose type the frontend has not registered
    dialogs: list[str]  # text of every dialog open after loading
    toasts: list[str]  # text of every toast (workflow validation and link fixes report there)
    page_errors: list[str]  # uncaught exceptions in the page while loading
    nodes: list[dict]  # per node: id, type, registered, has_errors, widgets [[name, value, saved], ...]
    serialized: dict  # app.graph.serialize(): the workflow as the frontend would save it
    prompt: dict  # app.graphToPrompt().output: the API prompt the frontend would queue


class Frontend:
    """One browser page on the ComfyUI frontend at `url`."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.page_errors: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        # Everything but our server (the node registry on api.comfy.org, ...) is refused at once
        # rather than left to time out: there is no network here, and none is needed.
        page.route(lambda address: not address.startswith(url), lambda route: route.abort())
        page.goto(url)
        page.wait_for_function("window.app?.graph && window.LiteGraph?.registered_node_types", timeout=120_000)
        # An extension (the frontend's own extension API) that notes each finished graph load:
        # `afterConfigureGraph` runs at the end of app.loadGraphData, with the missing node types.
        page.evaluate(
            """() => {
                window.consisidLoads = [];
                window.app.registerExtension({
                    name: "consisid.frontend_tools",
                    afterConfigureGraph(missing) {
                        window.consisidLoads.push(missing.map(m => typeof m === "object" ? m.type : m));
                    },
                });
            }"""
        )
        # The template browser, update notices and the like may open just after start-up.
        page.wait_for_timeout(300)
        self.close_dialogs()

    def command(self, command_id: str) -> None:
        self.page.evaluate("id => window.app.extensionManager.command.execute(id)", command_id)

    def close_dialogs(self) -> None:
        for _ in range(5):
            if not self.page.locator(".p-dialog").count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(100)

    def register_node_defs(self, defs: dict) -> None:
        """Adds node definitions as the frontend adds the server's /object_info at start-up."""
        self.page.evaluate("defs => window.app.registerNodesFromDefs(defs)", defs)

    def open_workflow(self, path: Path) -> Loaded:
        """Workflow > Open, pick `path`, and read back what the frontend made of it."""
        self.close_dialogs()
        errors_before = len(self.page_errors)
        loads_before = self.page.evaluate("window.consisidLoads.length")
        with self.page.expect_file_chooser() as chooser:
            self.command("Comfy.OpenWorkflow")
        chooser.value.set_files(str(path))
        self.page.wait_for_function("n => window.consisidLoads.length > n", arg=loads_before, timeout=30_000)
        self.page.wait_for_timeout(500)  # the workflow tab, dialogs and toasts come on later frames
        state = self.page.evaluate(
            """async () => {
                const text = selector => [...document.querySelectorAll(selector)].map(e => e.innerText.trim());
                const type = m => typeof m === "object" ? m.type : m;
                const active = window.app.extensionManager.workflow.activeWorkflow;
                const warnings = active && "pendingWarnings" in active ? (active.pendingWarnings ?? {}) : null;
                const nodes = window.app.graph.nodes.map(node => ({
                    id: node.id, type: node.type, registered: node.type in LiteGraph.registered_node_types,
                    has_errors: !!node.has_errors,
                    // [name, value, saved]: saved widgets are those widgets_values holds
                    widgets: (node.widgets ?? []).map(w => [w.name, w.value ?? null, w.serialize !== false]),
                }));
                return {
                    reported_missing: window.consisidLoads.at(-1),
                    active_workflow: window.app.extensionManager.workflow.activeWorkflow?.path ?? null,
                    dialog_missing: warnings ? (warnings.missingNodeTypes ?? []).map(type)
                        : [...document.querySelectorAll('.comfy-missing-nodes .p-listbox-option')]
                        .map(e => e.querySelector('span')?.innerText.trim() ?? e.innerText.trim()),
                    missing_models: (warnings?.missingModelCandidates ?? []).map(m => m.name ?? JSON.stringify(m)),
                    warnings_panel: warnings !== null,
                    dialogs: text('.p-dialog'),
                    toasts: text('.p-toast-message'),
                    nodes,
                    graph_missing: nodes.filter(n => !n.registered || n.has_errors).map(n => n.type),
                    serialized: window.app.graph.serialize(),
                    prompt: (await window.app.graphToPrompt()).output,
                };
            }"""
        )
        return Loaded(name=path.name, page_errors=self.page_errors[errors_before:], **state)

    def graph_bounds(self) -> list[float]:
        """[x, y, width, height] of all nodes, title bars included, in graph units."""
        return self.page.evaluate(
            """() => {
                const t = LiteGraph.NODE_TITLE_HEIGHT;
                const nodes = window.app.graph.nodes;
                const x0 = Math.min(...nodes.map(n => n.pos[0]));
                const y0 = Math.min(...nodes.map(n => n.pos[1] - t));
                const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
                const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
                return [x0, y0, x1 - x0, y1 - y0];
            }"""
        )

    def picture(self, zoom: float = PICTURE_ZOOM, margin: int = PICTURE_MARGIN) -> bytes:
        """A PNG of the whole graph at `zoom`, the page sized to the graph, menus hidden."""
        self.close_dialogs()
        self.page.add_style_tag(content="button:has(> .pi-bars) { display: none !important; }")
        if not self.page.evaluate("window.app.extensionManager.focusMode"):
            self.command("Workspace.ToggleFocusMode")  # hides the side bar, top menu and tabs
        x, y, width, height = self.graph_bounds()
        self.page.set_viewport_size(
            {"width": round(width * zoom) + 2 * margin, "height": round(height * zoom) + 2 * margin}
        )
        self.page.wait_for_timeout(200)  # the canvas follows the window's size
        self.page.evaluate(
            """([x, y, zoom, margin]) => {
                const canvas = window.app.canvas;
                canvas.deselectAll?.();
                canvas.ds.scale = zoom;
                canvas.ds.offset = [margin / zoom - x, margin / zoom - y];
                canvas.setDirty(true, true);
            }""",
            [x, y, zoom, margin],
        )
        self.page.wait_for_timeout(500)  # drawn, and the DOM widgets (text boxes) moved over it
        png = self.page.screenshot()
        self.page.set_viewport_size(VIEWPORT)
        return png


@contextlib.contextmanager
def frontend(url: str, executable: str | None = None):
    """A Frontend in a fresh headless Chromium (its own temporary profile); closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = executable or chromium_path()
    if executable is None:
        raise FileNotFoundError("no Chromium found: install it (apt-get install chromium) or set CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="consisid-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT,
        )
        try:
            yield Frontend(context.pages[0] if context.pages else context.new_page(), url)
        finally:
            context.close()


def small_png(png: bytes, limit: int = PICTURE_MAX_BYTES) -> bytes:
    """The PNG optimised by PIL, and cut to an adaptive palette if it is still over `limit`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    for colors in (256, 128, 64):
        if out.tell() <= limit:
            break
        out = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, "PNG", optimize=True
        )
    return out.getvalue()


def write_pictures(out: Path = PICTURES, names: list[str] | None = None) -> list[Path]:
    """docs/workflows/<name>.png for each workflow (all of workflows/*.json by default).

    Third-party nodes (RIFE VFI) are drawn from their definitions in the node-spec snapshot, as
    the frontend would draw them with their pack installed; without it they are red boxes."""
    names = names or sorted(p.name for p in WORKFLOWS.glob("*.json"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="consisid-frontend-") as tmp, running(prepare_base(Path(tmp))) as server:
        with frontend(server.url) as page:
            page.register_node_defs(snapshot_node_defs())
            for name in names:
                loaded = page.open_workflow(WORKFLOWS / name)
                if loaded.graph_missing or loaded.dialogs:
                    log.warning("%s: missing %s, dialogs %s", name, loaded.graph_missing, loaded.dialogs)
                target = out / (Path(name).stem + ".png")
                target.write_bytes(small_png(page.picture()))
                log.info("%s: %d bytes", target, target.stat().st_size)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow files in workflows/ (default: all)")
    parser.add_argument("--out", type=Path, default=PICTURES, help=f"folder for the PNGs (default {PICTURES})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.environ.get("COMFYUI_DIR"):
        log.error("set COMFYUI_DIR to a ComfyUI source folder")
        return 2
    write_pictures(args.out, args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
