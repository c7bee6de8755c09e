"""The pack works offline, proven: no socket connection and no name lookup during `embed`,
`generate --segments 2 --lora … --score` and a native graph (face models, identity, native model,
core sampling).

Two witnesses, each with what it can and cannot see:

- Python's audit hooks, in the test's own process: every connection, datagram and name lookup made
  through Python's socket module (`socket.connect`, `sendto`, `sendmsg`, `getaddrinfo`,
  `gethostbyname[_ex]`, `gethostbyaddr`, `getnameinfo`) and urllib / http.client requests, with the
  stack that made it. They do not see native code calling the C library itself: ONNX Runtime's
  telemetry looked its server up from its own threads (1DS, with curl).
- A network namespace of the command's own (`unshare -rn` or `unshare -n`; skipped where the system
  allows neither): every address there is local, and listeners wait on UDP and TCP port 53 and TCP
  ports 80 and 443. A name lookup sent to any resolver, or a connection to a web port, from any
  thread of the command, native ones included, reaches them and is counted. The command then stays
  alive `LINGER` seconds more, as a ComfyUI server would, for what is sent late (ONNX Runtime's
  first upload came about 9 s after its import). It cannot see a connection to another port (refused
  there, unseen), nor a lookup answered without the network (/etc/hosts).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINGER = 15
NETWORK_EVENTS = {
    "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "urllib.Request", "http.client.connect",
}
_CALLS: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _CALLS is not None and event in NETWORK_EVENTS:
        _CALLS.append(f"{event}{args!r:.200}\n" + "".join(traceback.format_stack(limit=12)[:-1]))


sys.addaudithook(_audit)


class _NoNetwork:
    """Inside, every network call Python's audit hooks see is noted; on leaving, none may be."""

    def __enter__(self):
        global _CALLS
        _CALLS = []
        return self

    def __exit__(self, *exc) -> None:
        global _CALLS
        calls, _CALLS = _CALLS, None
        if exc[0] is None:
            assert calls == [], "network calls:\n" + "\n".join(calls)


@pytest.fixture
def photo(tmp_path) -> Path:
    """A real photo: the tiny face models find faces wherever it is bright."""
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


@pytest.fixture
def lora(tmp_path, tiny_model) -> Path:
    import torch
    from safetensors.torch import save_file

    out_features, in_features = tiny_model.transformer.transformer_blocks[0].attn1.to_q.weight.shape
    key = "transformer.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "style.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(4, in_features) * 0.01,
               f"{key}.lora_B.weight": torch.randn(out_features, 4) * 0.01}, path)
    return path


def _commands(tiny_dir, photo, lora, out: Path) -> dict[str, list[str]]:
    return {
        "embed": ["embed", "--model", str(tiny_dir), "--face", str(photo), "--out", str(out / "me.safetensors")],
        "generate": ["generate", "--model", str(tiny_dir), "--face", str(photo), "--prompt", "a man smiling",
                     "--steps", "2", "--length", "9", "--segments", "2", "--lora", str(lora), "--score",
                     "--out", str(out / "v.mp4")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["embed", "generate"])
def test_the_commands_make_no_network_call_that_python_sees(tiny_dir, photo, lora, tmp_path, command):
    from consisid_core.cli import main

    args = _commands(tiny_dir, photo, lora, tmp_path)[command]
    with _NoNetwork():
        assert main(args) == 0


def test_the_audit_hooks_see_a_lookup():
    """The witness works: a name lookup inside is a failure (here of a numeric address: no query leaves)."""
    with pytest.raises(AssertionError, match="socket.getaddrinfo"), _NoNetwork():
        socket.getaddrinfo("127.0.0.1", 443, flags=socket.AI_NUMERICHOST)


# ---------------------------------------------------------------------------------------------
# A network namespace of the command's own


def _unshare() -> list[str] | None:
    """The command that runs a process in a network namespace of its own, where `ip` can set it up."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for flags in ("-rn", "-n"):
        if subprocess.run(["unshare", flags, "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
            return ["unshare", flags]
    return None


UNSHARE = _unshare()
NEEDS_NAMESPACE = pytest.mark.skipif(UNSHARE is None, reason="no network namespace here (unshare -n and ip)")


def _in_namespace(code: str, env: dict | None = None) -> dict:
    """Run `code` (which sets `status`) with this Python in a network namespace of its own (see the
    module doc), then wait `LINGER` seconds; what the listeners saw, and the exit status."""
    script = f"import sys, time\n{code}\ntime.sleep({LINGER})\nsys.exit(status)\n"
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [*UNSHARE, sys.executable, __file__, sys.executable, "-c", script], capture_output=True, text=True,
        timeout=900, env={**os.environ, **(env or {}), "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
@NEEDS_NAMESPACE
@pytest.mark.parametrize("command", ["embed", "generate"])
def test_the_commands_make_no_network_call_from_any_thread(tiny_dir, photo, lora, tmp_path, command):
    args = _commands(tiny_dir, photo, lora, tmp_path)[command]
    found = _in_namespace(f"from consisid_core.cli import main\nstatus = main({args!r})")
    assert found["code"] == 0, found
    assert found["seen"] == [], found["seen"]


NATIVE_LOOKUP = """
import ctypes
answer = ctypes.c_void_p()
ctypes.CDLL(None).getaddrinfo(b"consisid-witness.example.org", b"443", None, ctypes.byref(answer))
status = 0
"""


@pytest.mark.slow
@NEEDS_NAMESPACE
def test_the_namespace_sees_a_lookup_from_native_code():
    """The witness works: a name lookup made by the C library itself (as ONNX Runtime's telemetry made
    one from its own threads), unseen by the audit hooks, reaches the listeners."""
    found = _in_namespace(NATIVE_LOOKUP)
    assert found["code"] == 0, found
    assert any(seen.startswith("udp 53") and "consisid-witness" in seen for seen in found["seen"]), found


# ---------------------------------------------------------------------------------------------
# A native graph, in ComfyUI


NATIVE_GRAPH = """
import numpy as np
import torch
from native_tools import import_comfyui
from consisid_core.media import read_image
import_comfyui()
import comfy.sample, folder_paths
from consisid_pack.nodes.faces import ConsisIDFaceEmbed, ConsisIDFaceModelsLoader
from consisid_pack.nodes.native.nodes import ConsisIDNativeModelLoader, identity_conditioned
models.mkdir(parents=True)
(models / "tiny").symlink_to(tiny, target_is_directory=True)
folder_paths.add_model_folder_path("consisid", str(models))
def native_graph():
    (faces,) = ConsisIDFaceModelsLoader().load("tiny", "cpu", "cpu")
    image = torch.from_numpy(np.array(read_image(photo).convert("RGB"))).float()[None] / 255
    identities, _, _ = ConsisIDFaceEmbed().embed(image, faces, -1)
    (model,) = ConsisIDNativeModelLoader().load("tiny", "fp32")
    text = torch.randn(1, 226, 32)
    positive, negative = identity_conditioned([[text, {}]], [[text, {}]], identities[0],
                                              torch.zeros(1, 16, 1, 8, 12))
    latent = torch.zeros(1, 16, 3, 8, 12)
    out = comfy.sample.sample(model, torch.randn_like(latent), 2, 6.0, "ddim", "simple", positive, negative,
                              latent, seed=1, disable_pbar=True)
    assert torch.isfinite(out).all()
"""


@pytest.fixture
def comfyui():
    from native_tools import NATIVE_COGVIDEOX

    if not NATIVE_COGVIDEOX:
        pytest.skip("COMFYUI_DIR is not set, or its ComfyUI has no native CogVideoX")


@pytest.mark.slow
@pytest.mark.comfyui
def test_a_native_graph_makes_no_network_call_that_python_sees(comfyui, native_tiny_dir, photo, tmp_path):
    scope = {"models": tmp_path / "consisid", "photo": photo, "tiny": native_tiny_dir}
    exec(NATIVE_GRAPH, scope)  # noqa: S102 - the graph shared with the namespace test below
    with _NoNetwork():
        scope["native_graph"]()


@pytest.mark.slow
@pytest.mark.comfyui
@NEEDS_NAMESPACE
def test_a_native_graph_makes_no_network_call_from_any_thread(comfyui, native_tiny_dir, photo, tmp_path):
    setup = (f"from pathlib import Path\nmodels, photo = Path({str(tmp_path / 'consisid')!r}), Path({str(photo)!r})\n"
             f"tiny = Path({str(native_tiny_dir)!r})\n")
    found = _in_namespace(setup + NATIVE_GRAPH + "native_graph()\nstatus = 0")
    assert found["code"] == 0, found
    assert found["seen"] == [], found["seen"]


# ---------------------------------------------------------------------------------------------
# `python tests/test_offline.py COMMAND…`, run inside the namespace: listeners, then the command


def _listen(kind: int, family: int, port: int, seen: list[str]) -> None:
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        if kind == socket.SOCK_DGRAM:
            while True:
                data, peer = s.recvfrom(4096)
                seen.append(f"udp {port} from {peer[0]}: {data[12:80]!r}")  # a DNS query's question
        s.listen()
        while True:
            connection, peer = s.accept()
            seen.append(f"tcp {port} from {peer[0]}")
            connection.close()


def _namespace_main(command: list[str]) -> None:
    """Every address local (IPv4, and IPv6 where it can be), listeners on the ports of name lookups
    and the web, then `command`; one JSON line: its exit status and what the listeners saw."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo"], check=True)
    ipv6 = subprocess.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo"], capture_output=True)
    families = [socket.AF_INET] + ([socket.AF_INET6] if ipv6.returncode == 0 else [])
    seen: list[str] = []
    for family in families:
        for kind, port in ((socket.SOCK_DGRAM, 53), (socket.SOCK_STREAM, 53), (socket.SOCK_STREAM, 80),
                           (socket.SOCK_STREAM, 443)):
            threading.Thread(target=_listen, args=(kind, family, port, seen), daemon=True).start()
    time.sleep(0.5)
    done = subprocess.run(command)
    time.sleep(0.5)
    print(json.dumps({"code": done.returncode, "seen": seen}))


if __name__ == "__main__":
    _namespace_main(sys.argv[1:])
