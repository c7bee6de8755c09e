"""Installing beside what users have: no ONNX Runtime build is a hard requirement (they share one
module, so requiring `onnxruntime` replaced a ComfyUI's `onnxruntime-gpu`), and without one the pack
still loads while the face models say exactly what to install."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from workflow_tools import import_pack

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _requirements_txt() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_no_onnxruntime_build_is_required_and_the_extra_brings_the_cpu_one():
    dependencies = [Requirement(r) for r in _pyproject()["dependencies"]]
    names = {canonicalize_name(r.name) for r in dependencies}
    assert not {n for n in names if n.startswith("onnxruntime")}, names
    # ComfyUI-Manager installs requirements.txt: the same list
    assert {(canonicalize_name(r.name), str(r.specifier)) for r in _requirements_txt()} == {
        (canonicalize_name(r.name), str(r.specifier)) for r in dependencies
    }
    extras = _pyproject()["optional-dependencies"]
    assert [Requirement(r).name for r in extras["onnxruntime"]] == ["onnxruntime"]
    # CI installs .[test]: it must get ONNX Runtime through the extra
    assert any(
        canonicalize_name(Requirement(r).name) == canonicalize_name(_pyproject()["name"])
        and Requirement(r).extras == {"onnxruntime"}
        for r in extras["test"]
    )


def _without_onnxruntime(code: str, stand_in: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python where `import onnxruntime` finds `stand_in` (None: no ONNX Runtime;
    an empty module: what is left after uninstalling one build installed over another); it writes
    one JSON object to stdout."""
    script = f"import json, sys, types\nsys.modules['onnxruntime'] = {stand_in}\n" + textwrap.dedent(code)
    path = os.pathsep.join([str(ROOT / "tests" / "helpers"), *filter(None, [os.environ.get("PYTHONPATH")])])
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {}), "PYTHONPATH": path},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _names_the_install_commands(message: str) -> bool:
    """Both builds, each with the pip of this very Python (ComfyUI's, where it runs)."""
    return (
        sys.executable in message
        and " -m pip install onnxruntime' (CPU)" in message
        and " -m pip install onnxruntime-gpu' for CUDA" in message
    )


def test_without_onnxruntime_the_pack_lists_its_nodes_and_the_face_loader_says_what_to_install(home):
    found = _without_onnxruntime(
        """
        from workflow_tools import import_pack
        import_pack()
        from consisid_pack.nodes import NODE_CLASS_MAPPINGS
        loader = NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"]
        spec = loader.INPUT_TYPES()["required"]
        try:
            loader().load("tiny", "cpu", "cpu")
            error = None
        except ImportError as e:
            error = str(e)
        json.dump({"nodes": sorted(NODE_CLASS_MAPPINGS), "face_encoders": spec["face_encoder"][0],
                   "providers": spec["provider"][0], "error": error,
                   "still_absent": sys.modules["onnxruntime"] is None}, sys.stdout)
        """,
        "None",
    )
    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    assert found["still_absent"], "something imported a real onnxruntime: the test did not run without it"
    assert found["nodes"] == sorted(NODE_CLASS_MAPPINGS)
    assert found["face_encoders"] == ["tiny"] and found["providers"] == ["cpu"]
    assert found["error"] is not None and "not installed" in found["error"], found["error"]
    assert _names_the_install_commands(found["error"]), found["error"]


def test_a_broken_onnxruntime_is_reported_with_the_reinstall_commands():
    found = _without_onnxruntime(
        """
        from consisid_core.face import resolve_providers
        try:
            resolve_providers("cpu")
            error = None
        except ImportError as e:
            error = str(e)
        json.dump({"error": error}, sys.stdout)
        """,
        "types.ModuleType('onnxruntime')",
    )
    assert found["error"] is not None and "incomplete" in found["error"], found["error"]
    assert "uninstall onnxruntime and onnxruntime-gpu" in found["error"]
    assert _names_the_install_commands(found["error"]), found["error"]


def test_without_onnxruntime_the_cli_says_what_to_install_in_one_line(tiny_dir, tmp_path):
    photo = tmp_path / "face.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(photo)
    out = tmp_path / "id.safetensors"
    found = _without_onnxruntime(
        f"""
        import contextlib, io
        from consisid_core.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["embed", "--model", {str(tiny_dir)!r}, "--face", {str(photo)!r}, "--out", {str(out)!r}])
        json.dump({{"code": code, "err": err.getvalue()}}, sys.stdout)
        """,
        "None",
    )
    assert found["code"] == 2
    assert found["err"].startswith("error: ") and found["err"].count("\n") == 1, found["err"]
    assert _names_the_install_commands(found["err"]), found["err"]
    assert not out.exists()


def test_the_declared_comfyui_range_starts_at_the_oldest_version_ci_runs():
    """`requires-comfyui` (read by ComfyUI-Manager and the registry) is the oldest ComfyUI whose
    real-ComfyUI and frontend tests .ci/run runs."""
    import re

    from packaging.version import Version

    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["tool"]["comfy"]["requires-comfyui"]
    (versions,) = re.findall(r"^for version in ([\d. ]+); do$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    assert declared == f">={min(versions.split(), key=Version)}"
