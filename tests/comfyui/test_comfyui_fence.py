"""The ComfyUI fence (`nodes/fence.py`) in a real ComfyUI: skipped unless COMFYUI_DIR is set.

`comfy_fence.py` breaks each ComfyUI internal the pack relies on, one at a time, and checks the one
log line, the fallback (same latents) or the one-line refusal, and what the same call does without
the fence. A real server's log says nothing of the fence on a ComfyUI the pack was tested on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_tools import script_env

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]


WRAPPER = ["as expected", "partial_load", "lora_patches", "model_management", "unload_one", "progress", "previews",
           "cancel", "folders", "t5_tokens", "t5_tokens", "dynamic_vram", "native_face_patcher",
           "prompt_handlers"]
NATIVE = ["native", "native_load", "native_transformer", "native_transformer", "native_model_sampling", "native_patches",
          "native_conds", "native_percent", "native_dynamic_cfg", "native_dpm", "native_lora", "native_vae",
          "native_reference_decode", "native_first_frame_sample", "native_devices", "native_quant"]
"""What comfy_fence.py says, one line each: the wrapper path's features, then (on a ComfyUI with native
CogVideoX) the native path's."""


def test_each_broken_comfyui_internal_is_named_once_and_falls_back_or_is_refused(tmp_path, request):
    from consisid_core.tiny import make_tiny
    from native_tools import NATIVE_COGVIDEOX, vae_file

    checkpoint = make_tiny(tmp_path / "tiny")
    native = []
    if NATIVE_COGVIDEOX:
        folder = request.getfixturevalue("native_tiny_dir")
        native = [folder, vae_file(folder)]
    script = Path(__file__).parent / "comfy_fence.py"
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), *map(str, native)], cwd=COMFYUI_DIR, capture_output=True,
        text=True, timeout=900, env=script_env(COMFYUI_DIR),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    said = [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert said == WRAPPER + (NATIVE if NATIVE_COGVIDEOX else []) + ["fence"], result.stdout
    assert result.stdout.count("without the fence:") == 4 + (9 if NATIVE_COGVIDEOX else 0), result.stdout
