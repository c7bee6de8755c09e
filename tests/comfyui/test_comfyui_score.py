"""ConsisID Identity Score inside a real ComfyUI: skipped unless COMFYUI_DIR names a ComfyUI source
folder (see tests/comfyui/test_comfyui.py, whose server and helpers this uses)."""

import io
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from comfy_server import COMFYUI_DIR, api_prompt, at_tiny_size, base, server  # noqa: F401 - fixtures used by name

pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]


def test_identity_score_runs_on_the_basic_workflows_frames(server):
    prompt = at_tiny_size(api_prompt(server, "consisid_basic.json"))
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt["900"] = {
        "class_type": "ConsisIDIdentityScore",
        "inputs": {
            "frames": [ids["ConsisIDVAEDecode"], 0],
            "face_models": [ids["ConsisIDFaceModelsLoader"], 0],
            "identity": [ids["ConsisIDFaceEmbed"], 0],
            "frames_sampled": 16,
            "frames_per_segment": 5,
        },
    }
    prompt["901"] = {"class_type": "PreviewImage", "inputs": {"images": ["900", 2]}}
    result = server.run(prompt)
    assert result["status"]["status_str"] == "success", result["status"]
    (text,) = result["outputs"]["900"]["text"]
    lines = text.splitlines()
    assert lines[0].startswith("FaceSim-Arc ") and "sampled frames of 9" in lines[0]
    assert lines[1].startswith("segment 1 (frames 0-4): ") and lines[2].startswith("segment 2 (frames 4-8): ")
    assert len(lines) == 3 + 16 and all(line.startswith("frame ") for line in lines[3:])
    mean = float(lines[0].split()[1])
    assert 0.0 <= mean <= 1.0
    (image,) = result["outputs"]["901"]["images"]
    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as response:
        assert Image.open(io.BytesIO(response.read())).size == (512, 256)
