"""The fence around diffusers' internals, read from the sources: outside `diffusers_hooks.py` (and
`decoder.py`'s self-checked rebuild of the VAE decoder), no module of the core

- imports from diffusers other than its documented entry points (`diffusers`, `diffusers.hooks`),
  or a name starting with `_` from them;
- reads or passes a name starting with `_` (an attribute other than its own class's, a keyword
  argument), which is how diffusers' private API is reached through an object;
- writes an attribute of a diffusers model or pipeline (a name such as `transformer`, `vae` or
  `pipe` in the target), which diffusers does not document.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCES = {"consisid_core/diffusers_hooks.py", "consisid_core/decoder.py", "consisid_core/tiling.py"}
PUBLIC_MODULES = {"diffusers", "diffusers.hooks"}
MODELS = {"transformer", "vae", "pipe", "pipeline", "scheduler", "text_encoder", "tokenizer"}
"""Names under which the code holds diffusers' (and transformers') models and pipelines."""
STANDARD_LIBRARY = {("os", "_exit")}
"""The standard library's documented names that start with `_`."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _names_in(node: ast.AST) -> set[str]:
    """The names and attribute names of an assignment target, e.g. {model, transformer, x}."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def private_diffusers_uses(source: str) -> list[str]:
    """`line: what` for each use of diffusers' private API in `source` (see the module docstring)."""
    tree = ast.parse(source)
    own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)} | {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusers":
            private = [a.name for a in node.names if _private(a.name)]
            if node.module not in PUBLIC_MODULES or private:
                found.append(f"{line}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "diffusers" and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            named = isinstance(owner, ast.Name) and (owner.id in own_classes or (owner.id, node.attr) in STANDARD_LIBRARY)
            if not named:
                found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg and _private(node.arg):
            found.append(f"{line}: {node.arg}=")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and _names_in(target.value) & MODELS:
                    found.append(f"{line}: {ast.unparse(target)} = …")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and _names_in(node.args[0]) & MODELS:
                found.append(f"{line}: {ast.unparse(node)}")
    return found


def _sources() -> list[Path]:
    files = sorted((ROOT / "consisid_core").rglob("*.py"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in FENCES]


def test_no_private_diffusers_name_outside_the_fences():
    uses = {
        f.relative_to(ROOT).as_posix(): private_diffusers_uses(f.read_text(encoding="utf-8")) for f in _sources()
    }
    assert {path: found for path, found in uses.items() if found} == {}
    assert len(uses) > 20  # the core was read


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN",
         "1: from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN"),
        ("from diffusers.models import _modeling_parallel", "1: from diffusers.models import _modeling_parallel"),
        ("from diffusers import _private_helper", "1: from diffusers import _private_helper"),
        ("import diffusers.models.attention_dispatch", "1: import diffusers.models.attention_dispatch"),
        ("backend = api.backends._NATIVE_CUDNN", "1: ._NATIVE_CUDNN"),
        ("out = attend(q, k, v, _parallel_config=config)", "1: _parallel_config="),
        ("def run(model, s):\n    model.transformer.local_face_scale = s", "2: model.transformer.local_face_scale = …"),
        ("def run(transformer):\n    setattr(transformer, 'local_face_scale', 2)",
         "2: setattr(transformer, 'local_face_scale', 2)"),
    ],
)
def test_the_check_finds_each_kind_of_private_use(snippet, expected):
    assert private_diffusers_uses(snippet) == [expected]


def test_the_check_lets_public_uses_pass():
    snippet = (
        "import diffusers\nfrom diffusers import ConsisIDPipeline\nfrom diffusers.hooks import apply_group_offloading\n"
        "class Colour:\n    def match(self):\n        return Colour._of(self._cache, diffusers.__version__)\n"
        "def run(weight, data):\n    weight.data = data\n"
    )
    assert private_diffusers_uses(snippet) == []


def test_a_private_name_added_to_the_core_fails_the_check(tmp_path):
    source = (ROOT / "consisid_core" / "sampling.py").read_text(encoding="utf-8")
    assert private_diffusers_uses(source) == []
    changed = source + "\n\ndef _identity_strength(model, scale):\n    model.transformer.local_face_scale = scale\n"
    (found,) = private_diffusers_uses(changed)
    assert found.endswith("model.transformer.local_face_scale = …")
