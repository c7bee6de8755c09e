"""The long-video workflow inside a real ComfyUI (see tests/comfyui/test_comfyui.py): skipped unless
COMFYUI_DIR names a ComfyUI source folder.

    COMFYUI_DIR=~/ComfyUI ~/comfy-venv/bin/python -m pytest tests/comfyui/test_comfyui_long_video.py
"""

import pytest

from comfy_server import COMFYUI_DIR, api_prompt, frame_shape, at_tiny_size, videos, base, server  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]

F = 9  # frames per segment at the tiny checkpoint's size


def _tiny_long(prompt: dict, steps: int = 2) -> dict:
    """The shipped graph at the tiny size (`at_tiny_size`), its Extend nodes too."""
    prompt = at_tiny_size(prompt, steps)
    for node in prompt.values():
        if node["class_type"] == "ConsisIDExtend":
            node["inputs"].update(length=F, width=96, height=64, steps=steps)
    return prompt


def test_long_video_workflow_runs_three_segments_and_saves_them(server):
    prompt = _tiny_long(api_prompt(server, "consisid_long_video.json"))
    assert [n["inputs"]["seed"] for n in prompt.values() if n["class_type"] in ("ConsisIDSampler", "ConsisIDExtend")] \
        == [42, 43, 44]
    before = set(videos(server))
    result = server.run(prompt)
    assert result["status"]["status_str"] == "success", result["status"]
    (video,) = set(videos(server)) - before
    assert frame_shape(video) == (2 * (3 * F - 2), 64, 96)  # three segments, the seams once; the RIFE stand-in doubles


def test_extend_with_frames_of_another_size_stops_with_one_line(server):
    prompt = _tiny_long(api_prompt(server, "consisid_long_video.json"))
    last = [key for key, n in prompt.items() if n["class_type"] == "ConsisIDExtend"][-1]
    prompt[last]["inputs"]["width"] = 112
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error"
    (error,) = [data for event, data in result["status"]["messages"] if event == "execution_error"]
    assert error["node_id"] == last
    assert error["exception_message"].strip() == (
        "the previous frames are 96×64, this segment is 112×64: every segment of a video has one size; set width "
        "and height to the previous frames' (extend before upscaling)"
    )
