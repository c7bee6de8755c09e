"""The pack inside a real ComfyUI (the server of `comfy_server.py`): skipped unless COMFYUI_DIR
names a ComfyUI source folder. Run with a Python that has both ComfyUI's requirements and this
pack's, e.g. `COMFYUI_DIR=~/ComfyUI ~/comfy-venv/bin/python -m pytest tests/comfyui/test_comfyui.py`.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_server import (COMFYUI_DIR, OLD_NAMES_WORKFLOW, api_prompt, at_tiny_size, base, running,  # noqa: F401 (fixtures)
                          server)
from workflow_tools import CHECKPOINT, our_specs, script_env, to_api

pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]

OURS = set(our_specs())


def test_the_fence_finds_this_comfyui_as_the_pack_expects(server):
    """nodes/fence.py checked every ComfyUI internal the pack uses when it loaded: nothing differs."""
    log = (server.base / "server.log").read_text()
    assert "consisid" in log.lower() and "ConsisID: this ComfyUI" not in log


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    assert OURS <= set(info)
    ours = our_specs()
    for name in OURS:
        assert info[name]["category"] == "ConsisID"
        assert info[name]["description"]
        assert list(info[name]["input"]["required"]) == list(ours[name]["input"]["required"])
    assert info["ConsisIDModelLoader"]["input"]["required"]["model"][0] == [CHECKPOINT, "diffusion_models/tiny.safetensors"]
    assert info["ConsisIDFaceModelsLoader"]["input"]["required"]["face_encoder"][0] == [CHECKPOINT]


def test_core_t5_workflow_fails_validation_only_at_the_missing_t5_file(server):
    """No T5-XXL file can be had here: validation must name CLIPLoader's file, and nothing else
    (the branch that does not need it, Save Identity, still runs)."""
    status, answer = server.post("/prompt", {"prompt": at_tiny_size(api_prompt(server, "consisid_core_t5.json"))})
    assert status == 200
    errors = answer["node_errors"]
    assert [e["class_type"] for e in errors.values()] == ["CLIPLoader"]
    assert "clip_name" in json.dumps(errors) and "t5xxl_fp16.safetensors" in json.dumps(errors)
    assert server.wait(answer["prompt_id"])["status"]["status_str"] == "success"


def test_interrupt_mid_sampling_leaves_the_server_healthy(server):
    prompt = at_tiny_size(api_prompt(server, "consisid_reuse_identity.json"), steps=1000)
    next(n for n in prompt.values() if n["class_type"] == "ConsisIDSampler")["inputs"]["seed"] = 7
    status, answer = server.post("/prompt", {"prompt": prompt})
    assert status == 200
    prompt_id = answer["prompt_id"]
    end = time.monotonic() + 120
    while not server.get("/queue")["queue_running"] and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(5)  # models load in well under a second: the sampler is some steps in
    status, _ = server.post("/interrupt", {})
    assert status == 200
    started = time.monotonic()
    result = server.wait(prompt_id, 120)
    assert time.monotonic() - started < 10, "the run did not stop at the next step"
    assert result["status"]["status_str"] == "error"
    assert any(event == "execution_interrupted" for event, _ in result["status"]["messages"])
    again = server.run(at_tiny_size(api_prompt(server, "consisid_reuse_identity.json")))
    assert again["status"]["status_str"] == "success"
    assert server.get("/system_stats")


"""consisid_reuse_identity.json as saved before ConsisID Sampler's inputs took core's names."""
SAMPLER_RENAMED = {"guidance": "cfg", "frames": "length", "image": "start_image"}
"""ConsisID Sampler's old input names -> the new."""


def _pixels(path: Path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _with_first_frame(prompt: dict, socket: str, prefix: str) -> dict:
    """`prompt` with a Load Image of the face photo into the sampler's first-frame `socket`, saving
    under `prefix`."""
    prompt["first"] = {"class_type": "LoadImage", "inputs": {"image": "consisid_face.png"}}
    for node in prompt.values():
        if node["class_type"] == "ConsisIDSampler":
            node["inputs"][socket] = ["first", 0]
        if node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = f"consisid/{prefix}"
    return prompt


def test_a_prompt_with_the_old_input_names_runs_as_the_new_one(server):
    """The prompt a frontend queued from a workflow saved before the rename (the file's widget values
    under the old names, as /object_info then listed them; its first frame in `image`) runs as the
    prompt with the new names: the same video, and one log line naming the rename."""
    specs = server.get("/object_info")
    old_specs = json.loads(json.dumps(specs))
    back = {new: old for old, new in SAMPLER_RENAMED.items()}
    sampler_spec = old_specs["ConsisIDSampler"]
    for kind in ("required", "optional"):
        sampler_spec["input"][kind] = {back.get(k, k): v for k, v in sampler_spec["input"][kind].items()}
        sampler_spec["input_order"][kind] = [back.get(k, k) for k in sampler_spec["input_order"][kind]]
    old = _with_first_frame(at_tiny_size(to_api(json.loads(OLD_NAMES_WORKFLOW.read_text()), old_specs)), "image", "old")
    (sampler,) = [n["inputs"] for n in old.values() if n["class_type"] == "ConsisIDSampler"]
    sampler["frames"] = sampler.pop("length")  # the tiny size `_tiny` set, under the old name
    assert set(SAMPLER_RENAMED) <= set(sampler) and not set(SAMPLER_RENAMED.values()) & set(sampler)
    sampler["seed"] = 11  # a run of its own, not one cached from another test
    new = _with_first_frame(at_tiny_size(api_prompt(server, "consisid_reuse_identity.json")), "start_image", "new")
    next(n for n in new.values() if n["class_type"] == "ConsisIDSampler")["inputs"]["seed"] = 11
    for prompt in (old, new):
        assert server.run(prompt)["status"]["status_str"] == "success"
    (old_video,), (new_video,) = (sorted((server.base / "output" / "consisid").glob(f"{p}_*.mp4")) for p in ("old", "new"))
    assert (_pixels(old_video) == _pixels(new_video)).all()
    log = (server.base / "server.log").read_text()
    assert log.count("(ConsisIDSampler) uses old input names, taken as the new ones "
                     "(guidance -> cfg, frames -> length, image -> start_image)") == 1


def _previews_while_running(server, prompt: dict) -> tuple[int, int, str]:
    """Run `prompt` as a websocket client would: (preview images, the sampler's progress updates, status)."""
    import asyncio
    import uuid

    import aiohttp  # ComfyUI's own server library

    sampler = next(key for key, node in prompt.items() if node["class_type"] == "ConsisIDSampler")

    async def watch():
        client = uuid.uuid4().hex
        previews = progress = 0
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId={client}") as ws:
            status, answer = server.post("/prompt", {"prompt": prompt, "client_id": client})
            assert status == 200, answer
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    # PREVIEW_IMAGE (1) or PREVIEW_IMAGE_WITH_METADATA (4), a big-endian event type first
                    previews += int.from_bytes(message.data[:4], "big") in (1, 4)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    progress += event["type"] == "progress" and data.get("node") == sampler
                    if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == answer["prompt_id"]:
                        break
        return previews, progress, server.wait(answer["prompt_id"])["status"]["status_str"]

    return asyncio.run(watch())


def test_latent_previews_follow_comfyuis_preview_method(server, base):
    """As ComfyUI's own samplers: none by default (`--preview-method none`), one per step when on.
    Without previews, ComfyUI v0.33 sends a step's progress at most every 100 ms, but always the
    first and the last; an update with a preview always goes."""
    prompt = at_tiny_size(api_prompt(server, "consisid_reuse_identity.json"), steps=3)
    next(n for n in prompt.values() if n["class_type"] == "ConsisIDSampler")["inputs"]["seed"] = 11
    previews, progress, status = _previews_while_running(server, prompt)
    assert (previews, status) == (0, "success") and 2 <= progress <= 3
    with running(base, ("--preview-method", "auto")) as previewing:
        prompt = at_tiny_size(api_prompt(previewing, "consisid_reuse_identity.json"), steps=3)
        next(n for n in prompt.values() if n["class_type"] == "ConsisIDSampler")["inputs"]["seed"] = 12
        assert _previews_while_running(previewing, prompt) == (3, 3, "success")


def test_comfy_clip_route_equals_the_checkpoint_t5_route():
    """A tiny T5 in ComfyUI's own T5-XXL code (CLIPLoader type sd3) and in transformers, same
    weights and tokenizer: the text node's 226-token embeddings agree."""
    script = Path(__file__).parent / "comfy_clip_parity.py"
    result = subprocess.run(
        [sys.executable, str(script)], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600,
        env=script_env(COMFYUI_DIR),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |diff|" in result.stdout


def test_load_identity_refuses_names_outside_the_input_folder(server):
    """A shared server: an API prompt naming `../` or an absolute path gets a validation error that
    reads the same whether a file is there or not, and the file is never read."""
    base = server.base
    secret = base / "secret.safetensors"  # a valid identity, beside input/
    shutil.copy(base / "input" / "identity.safetensors", secret)
    stat = secret.stat()
    os.utime(secret, ns=(stat.st_mtime_ns - 10**12, stat.st_mtime_ns))  # any read moves atime past mtime
    names = {
        "../secret.safetensors": True, str(secret): True, "input/../../secret.safetensors": True,
        "../nothing.safetensors": False, str(base / "nothing.safetensors"): False,
    }
    messages = set()
    for name in names:
        prompt = {
            "1": {"class_type": "ConsisIDLoadIdentity", "inputs": {"identity_file": name}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
        }
        status, answer = server.post("/prompt", {"prompt": prompt})
        assert status == 400, answer
        (error,) = answer["node_errors"]["1"]["errors"]
        assert error["type"] == "custom_validation_failed"
        details = error["details"]
        assert "\n" not in details and not any(w in details.lower() for w in ("exist", "found", "missing"))
        messages.add(details.replace(name, "<name>"))
    assert messages == {
        "identity_file - identity_file '<name>' is not one of the identity files in the input folder; "
        "pick one from the list (refresh it after adding files)"
    }
    assert secret.stat().st_atime_ns < secret.stat().st_mtime_ns, "the file outside the input folder was read"


def _count(log: Path, text: str) -> int:
    return log.read_text().count(text)


def test_our_models_stay_loaded_between_runs_and_go_on_unload_models(base):
    """ComfyUI holds our models as its own: loaded once (its log names each part), left loaded for
    the next run, unloaded by "Unload Models" (/free), loaded again by the run after."""
    parts = ("ConsisIDTransformer", "ConsisIDVAE")
    with running(base, ("--verbose", "DEBUG")) as server:
        log = base / "server.log"

        def run(seed: int) -> None:
            prompt = at_tiny_size(api_prompt(server, "consisid_reuse_identity.json"))
            next(n for n in prompt.values() if n["class_type"] == "ConsisIDSampler")["inputs"]["seed"] = seed
            assert server.run(prompt)["status"]["status_str"] == "success"

        run(21)
        assert [_count(log, f"Requested to load {p}") for p in parts] == [1, 1]
        run(22)  # resident: nothing is loaded or moved again
        assert [_count(log, f"Requested to load {p}") for p in parts] == [1, 1]
        status, _ = server.post("/free", {"unload_models": True})
        assert status == 200
        end = time.monotonic() + 60
        while min(_count(log, f"Unloading {p}") for p in parts) < 1 and time.monotonic() < end:
            time.sleep(0.2)
        assert [_count(log, f"Unloading {p}") for p in parts] == [1, 1]
        run(23)
        assert [_count(log, f"Requested to load {p}") for p in parts] == [2, 2]


def test_partial_load_casts_layers_per_call_and_changes_no_number(base):
    """ComfyUI's partial load of our castable transformer (a quarter of it "on the GPU", the rest
    cast per call) gives the latents of today's path, in fp32 and with fp8 weight storage."""
    script = Path(__file__).parent / "comfy_partial_load.py"
    checkpoint = base / "models" / "consisid" / CHECKPOINT
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint)], cwd=COMFYUI_DIR, capture_output=True, text=True,
        timeout=600, env=script_env(COMFYUI_DIR),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fp8 False: max |diff| 0.0" in result.stdout and "fp8 True: max |diff| 0.0" in result.stdout
    assert "t5: max |diff| 0.0" in result.stdout
