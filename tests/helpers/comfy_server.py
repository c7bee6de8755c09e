"""A real ComfyUI server for tests (`COMFYUI_DIR`): on the CPU, on a free loopback port, with the
pack as a custom node and tiny checkpoints in a temporary models folder (`--extra-model-paths-config`);
the `base` and `server` fixtures of the wrapper tests, and what they do with the shipped workflows."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from workflow_tools import CHECKPOINT, DATA, ROOT, SNAPSHOT, WORKFLOWS, to_api

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
DEVICE_ARGS = (() if os.environ.get("COMFYUI_GPU") else ("--cpu",)) + tuple(os.environ.get("COMFYUI_ARGS", "").split())
"""The server runs on the CPU; the GPU runbook (bench/README.md) sets COMFYUI_GPU=1 and COMFYUI_ARGS."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = base / "extra_model_paths.yaml"
        config.write_text(
            "consisid_test:\n"
            f"  base_path: {base}\n"
            "  consisid: models/consisid\n"
            "  diffusion_models: models/diffusion_models\n"
            "  vae: models/vae\n"
            "  loras: models/loras\n"
            "  text_encoders: models/text_encoders\n"
            "  upscale_models: models/upscale_models\n"
            "  custom_nodes: custom_nodes\n"
        )
        self.log = open(base / "server.log", "w")
        self.process = subprocess.Popen(
            [
                sys.executable, str(Path(COMFYUI_DIR) / "main.py"), *DEVICE_ARGS, "--listen", "127.0.0.1",
                "--port", str(self.port), "--extra-model-paths-config", str(config),
                "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
                "--user-directory", str(base / "user"), "--disable-all-custom-nodes",
                "--whitelist-custom-nodes", "consisid", *extra_args,
            ],
            cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self, seconds: float = 180) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {(self.base / 'server.log').read_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("ComfyUI did not answer in time")

    def run(self, prompt: dict, seconds: float = 600) -> dict:
        status, answer = self.post("/prompt", {"prompt": prompt})
        assert status == 200, answer
        return self.wait(answer["prompt_id"], seconds)

    def wait(self, prompt_id: str, seconds: float = 600) -> dict:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Models (a tiny checkpoint, and its transformer and VAE as single files), input and the pack."""
    from consisid_core.identity import save_identity
    from consisid_core.tiny import make_tiny, random_identity

    base = tmp_path_factory.mktemp("comfy")
    tiny = make_tiny(base / "models" / "consisid" / CHECKPOINT)
    for kind, part in (("diffusion_models", "transformer"), ("vae", "vae")):
        (base / "models" / kind).mkdir(parents=True)
        shutil.copy(tiny / part / "diffusion_pytorch_model.safetensors", base / "models" / kind / "tiny.safetensors")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "consisid").symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir()
    (base / "user").mkdir()
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage_data.astronaut()).save(base / "input" / "consisid_face.png")
    from consisid_core.checkpoint import Checkpoint

    save_identity(random_identity(Checkpoint.open(tiny).transformer_config, 3), base / "input" / "identity.safetensors")
    return base


@pytest.fixture(scope="module")
def server(base):
    with running(base) as server:
        yield server


@contextlib.contextmanager
def running(base: Path, extra_args: tuple[str, ...] = ()):
    """A ComfyUI server over `base` (models, custom_nodes, input, output, user), stopped on exit."""
    server = Server(base, extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def at_tiny_size(prompt: dict, steps: int = 3) -> dict:
    """The shipped graph at the tiny checkpoint's size; stand-ins for what cannot be had here."""
    for node_id, node in list(prompt.items()):
        inputs = node["inputs"]
        if node["class_type"] == "ConsisIDSampler":
            inputs.update(length=9, width=96, height=64, steps=steps)
        elif node["class_type"] == "ConsisIDModelLoader":
            inputs["dtype"] = "fp32"
        elif node["class_type"] == "RIFE VFI":  # a separate pack: a core node that also doubles the frames
            node["class_type"] = "RepeatImageBatch"
            node["inputs"] = {"image": inputs["frames"], "amount": 2}
    return prompt


def api_prompt(server, name: str) -> dict:
    """Workflow `name` in the API format, with the server's node specs (and RIFE VFI's, a separate pack)."""
    specs = server.get("/object_info")
    specs["RIFE VFI"] = json.loads(SNAPSHOT.read_text())["RIFE VFI"]
    return to_api(json.loads((WORKFLOWS / name).read_text()), specs)


def videos(server) -> list[Path]:
    """The videos the wrapper workflows saved, in name order."""
    return sorted((server.base / "output" / "consisid").glob("ConsisID_*.mp4"))


def frame_shape(path: Path) -> tuple[int, int, int]:
    """A video's (frames, height, width)."""
    import av

    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].height, frames[0].width


OLD_NAMES_WORKFLOW = DATA / "consisid_reuse_identity_old_names.json"
"""The reuse-identity workflow as saved before its inputs took core ComfyUI's names."""
