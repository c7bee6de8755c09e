"""The core's layering (pyproject.toml's `[tool.importlinter]` contracts), checked by `lint-imports`:
kept by the code as it is, broken by one import that goes up a layer, closes a circle or reaches
ComfyUI, wherever it is written (inside a function or under TYPE_CHECKING too)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages in `root`, with `root`'s pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120
    )


def test_the_core_keeps_its_layers():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


BAD_IMPORTS = {
    "a circle, inside a function": (
        "memory.py", "\n\ndef _estimate():\n    from .sampling import sample\n\n    return sample\n",
        ["The core is layered BROKEN", "The core has no import circle BROKEN",
         "consisid_core.memory is not allowed to import consisid_core.sampling"],
    ),
    "up a layer, under TYPE_CHECKING": (
        "checks.py", "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .identity import Identity\n",
        ["The core is layered BROKEN", "consisid_core.checks is not allowed to import consisid_core.identity"],
    ),
    "ComfyUI from the core": (
        "decoder.py", "\n\ndef _comfy():\n    import comfy.model_management\n\n    return comfy\n",
        ["Only nodes/ touches ComfyUI BROKEN", "consisid_core.decoder -> comfy"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_one_bad_import_breaks_a_contract(case, tmp_path):
    module, added, expected = BAD_IMPORTS[case]
    for package in ("consisid_core", "bench"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert _lint_imports(tmp_path).returncode == 0  # the copy as it is
    with open(tmp_path / "consisid_core" / module, "a", encoding="utf-8") as f:
        f.write(added)
    result = _lint_imports(tmp_path)
    assert result.returncode == 1
    for line in expected:
        assert line in result.stdout


def test_no_two_core_modules_define_a_public_function_of_one_name():
    """One home per name: no public function or class is defined in two core modules."""
    homes = defaultdict(list)
    for path in sorted((ROOT / "consisid_core").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                homes[node.name].append(path.relative_to(ROOT).as_posix())
    assert {name: paths for name, paths in homes.items() if len(paths) > 1} == {}


def long_functions(source: str, most: int = 60) -> list[str]:
    """`name (lines)` of each function in `source` longer than `most` lines, decorators left out."""
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1})" for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > most
    ]


def test_no_function_in_the_core_or_the_nodes_is_over_60_lines():
    found = {
        path.relative_to(ROOT).as_posix(): long
        for path in sorted([*(ROOT / "consisid_core").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")])
        if (long := long_functions(path.read_text(encoding="utf-8")))
    }
    assert found == {}
    assert long_functions("def f():\n" + "    x = 1\n" * 60) == ["f (61)"]


SHARED_NODE_MODULES = {"nodes.declared", "nodes.fence", "nodes.folders", "nodes.managed", "nodes.progress"}
"""What the wrapper's and the native path's nodes both build on; `nodes/__init__.py` collects them."""


def node_imports(source: str, package: str) -> set[str]:
    """The `nodes` modules (and packages) a file of `package` ("nodes" or "nodes.native") imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
            if module.startswith("nodes"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_wrapper_and_native_node_files_never_import_each_other():
    wrapper = {f"nodes.{p.stem}" for p in (ROOT / "nodes").glob("*.py")} - SHARED_NODE_MODULES - {"nodes.__init__"}
    crossings = {}
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        package = "nodes.native" if path.parent.name == "native" else "nodes"
        if f"{package}.{path.stem}" in SHARED_NODE_MODULES or path.stem == "__init__":
            continue
        imports = node_imports(path.read_text(encoding="utf-8"), package)
        crossing = imports & wrapper if package == "nodes.native" else {m for m in imports if m.startswith("nodes.native")}
        if crossing:
            crossings[path.relative_to(ROOT).as_posix()] = sorted(crossing)
    assert crossings == {}
    assert node_imports("from ..sampling import FIRST_FRAME_FIX\nfrom . import comfy_parts\n", "nodes.native") == {
        "nodes.sampling", "nodes.sampling.FIRST_FRAME_FIX", "nodes.native", "nodes.native.comfy_parts"}
    assert node_imports("from .native.nodes import ConsisIDNoise\n", "nodes") >= {"nodes.native.nodes"}
