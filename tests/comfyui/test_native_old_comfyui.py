"""On a ComfyUI without native CogVideoX (v0.3.64) the pack still loads quietly (no line for the native
path's assumptions, all off), the wrapper nodes are there, and each native node refuses in one line
when used. Runs when COMFYUI_DIR names such a ComfyUI
source folder (run with a Python that has its requirements); skipped otherwise."""

import subprocess
import sys

import pytest

from native_tools import COMFYUI_DIR, NATIVE_COGVIDEOX
from workflow_tools import HELPERS

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI_DIR or NATIVE_COGVIDEOX, reason="COMFYUI_DIR is not set, or its ComfyUI has native CogVideoX"
)]

SCRIPT = """
import sys
sys.path.insert(0, {comfy!r}); sys.path.insert(0, {tests!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management
import logging
said = []
logging.getLogger("consisid_pack").addHandler(type("H", (logging.Handler,), {{"emit": lambda h, r: said.append(r)}})())
from workflow_tools import import_pack
pack = import_pack()
from consisid_pack.nodes import fence
from consisid_pack.nodes.native import comfy_parts
from consisid_pack.nodes.native.nodes import (
    ConsisIDDPMSampler, ConsisIDDynamicCFG, ConsisIDFaceModules, ConsisIDIdentityConditioning, ConsisIDNativeLoRA,
    ConsisIDNativeModelLoader, ConsisIDNativeVAEDecode)
assert not comfy_parts.AVAILABLE
assert "ConsisIDSampler" in pack.NODE_CLASS_MAPPINGS and "ConsisIDNativeModelLoader" in pack.NODE_CLASS_MAPPINGS
native = [a.feature for a in comfy_parts.ASSUMPTIONS]
assert all(fence.check()[f] for f in native) and not said, (fence.check(), [r.getMessage() for r in said])
print("quiet:", len(native), "native features off, nothing logged")
for call in (lambda: ConsisIDDynamicCFG().patch(None), lambda: ConsisIDNativeModelLoader().load("x", "default"),
             lambda: ConsisIDNativeLoRA().apply(None, "x", 1.0), lambda: ConsisIDNativeVAEDecode().decode(dict(), None),
             lambda: ConsisIDFaceModules().apply(None, "x"), lambda: ConsisIDDPMSampler().get_sampler(1),
             lambda: ConsisIDIdentityConditioning().encode(None, None, None, None, 96, 64, 9, 1.0, 0.0, 1.0)):
    try:
        call()
    except fence.ComfyApiError as e:  # the pack's ConsisIDError
        print("refused:", e)
    else:
        raise SystemExit("not refused")
"""


def test_native_nodes_refuse_in_one_line_and_the_wrapper_loads():
    script = SCRIPT.format(comfy=COMFYUI_DIR, tests=str(HELPERS))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=COMFYUI_DIR)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "nothing logged" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(lines) == 7 and all("ComfyUI's own CogVideoX" in line and "wrapper nodes" in line for line in lines)
