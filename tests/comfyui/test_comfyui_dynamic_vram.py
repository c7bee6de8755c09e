"""Both paths in a real ComfyUI with dynamic VRAM (v0.33's comfy-aimdo, on by default with an NVIDIA
GPU), on the CPU with its construction forced on (`dynamic_vram_tools` says how, and what that
leaves untested). Skipped unless COMFYUI_DIR names a ComfyUI with dynamic VRAM (v0.33.0, not v0.3.64).

- the wrapper (`comfy_partial_load.py dynamic`): every fence probe passes with layers built as
  dynamic VRAM builds them, the pack says in one line that its transformer stays in the classic
  patcher, and a forced partial load of the transformer gives the whole load's latents (fp32, fp8),
  of the T5 its embeddings;
- the native MODEL (`comfy_native_dynamic_vram.py`): in core's dynamic patcher with its face layers
  beside it, the same latents as with dynamic VRAM off, and a full unload that puts every weight back.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_tools import script_env

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
HAS_DYNAMIC_VRAM = bool(COMFYUI_DIR) and "class ModelPatcherDynamic" in (
    Path(COMFYUI_DIR) / "comfy" / "model_patcher.py").read_text(encoding="utf-8")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow,
    pytest.mark.skipif(not HAS_DYNAMIC_VRAM, reason="COMFYUI_DIR is not set, or its ComfyUI has no dynamic VRAM"),
]


def _run(script: str, *args) -> str:
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script), *map(str, args)], cwd=COMFYUI_DIR, capture_output=True,
        text=True, timeout=600, env=script_env(COMFYUI_DIR),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return result.stdout


def test_the_wrappers_partial_load_with_dynamic_vram_changes_no_number(tmp_path):
    from consisid_core.tiny import make_tiny

    out = _run("comfy_partial_load.py", make_tiny(tmp_path / "tiny"), "dynamic")
    assert "fp8 False: max |diff| 0.0" in out and "fp8 True: max |diff| 0.0" in out and "t5: max |diff| 0.0" in out
    (line,) = [line for line in out.splitlines() if "dynamic VRAM is on" in line]
    assert line.startswith("ConsisID: ") and "load partly" in line


def test_the_native_model_samples_and_unloads_in_dynamic_vram_as_without(native_tiny_dir):
    out = _run("comfy_native_dynamic_vram.py", native_tiny_dir)
    assert "fence: every probe passes" in out and "native dynamic vram: all ok" in out
