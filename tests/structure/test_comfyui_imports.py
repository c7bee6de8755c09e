"""ComfyUI is used only through its fence: within the pack, only `nodes/fence.py` (and the native
path's `nodes/native/comfy_parts.py`, which the fence checks) import ComfyUI's modules; the core
never does. Read from the sources (AST), so an import added anywhere else fails here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "node_helpers",
                   "latent_preview", "nodes", "server", "execution"}
ALLOWED = {"nodes/fence.py", "nodes/native/comfy_parts.py"}


def comfyui_imports(source: str) -> list[str]:
    """The ComfyUI modules `source` imports (absolute imports only: `from .nodes` is the pack's own)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in COMFYUI_MODULES]
    return found


def test_only_the_fence_imports_comfyui():
    offenders = {}
    for path in sorted([ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "consisid_core").rglob("*.py")]):
        name = path.relative_to(ROOT).as_posix()
        if name not in ALLOWED and (found := comfyui_imports(path.read_text(encoding="utf-8"))):
            offenders[name] = found
    assert offenders == {"__init__.py": ["comfy.utils"]}  # the pack's one probe: is this ComfyUI?


def test_the_check_finds_an_import_added_elsewhere():
    assert comfyui_imports("import comfy.model_management as mm\nfrom folder_paths import get_input_directory\n"
                           "from .nodes import x\nimport torch\n") == ["comfy.model_management", "folder_paths"]
    assert comfyui_imports("def f():\n    from comfy.ops import manual_cast\n") == ["comfy.ops"]
