"""The ComfyUI fence (`nodes/fence.py`) in a real ComfyUI: skipped unless COMFYUI_DIR is set.

`comfy_fence.py` breaks each ComfyUI internal the pack relies on, one at a time, and checks the one
log line, the fallback (same latents) or the one-line refusal, and what the same call does without
the fence. A real server's log says nothing of the fence on a ComfyUI the pack was tested on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]


def test_each_broken_comfyui_internal_is_named_once_and_falls_back_or_is_refused(tmp_path):
    from consisid_core.tiny import make_tiny

    checkpoint = make_tiny(tmp_path / "tiny")
    script = Path(__file__).parent / "comfy_fence.py"
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint)], cwd=COMFYUI_DIR, capture_output=True, text=True,
        timeout=900, env=os.environ | {"PYTHONPATH": COMFYUI_DIR},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    said = [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert said == [
        "as expected", "partial_load", "lora_patches", "model_management", "unload_one", "progress", "previews",
        "cancel", "folders", "t5_tokens", "t5_tokens", "native_quant", "fence",
    ], result.stdout
    assert result.stdout.count("without the fence:") == 5, result.stdout
