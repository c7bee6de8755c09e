"""The pack works offline, proven: no socket connection and no name lookup during `embed`,
`generate --segments 2 --lora … --score` and a native graph (face models, identity, native model,
core sampling).

Each runs in a Python process of its own, under two witnesses, each with what it can and cannot see:

- Python's audit hooks, from the process's first line (imports included): every connection,
  datagram and name lookup made through Python's socket module (`socket.connect`, `sendto`,
  `sendmsg`, `getaddrinfo`, `gethostbyname[_ex]`, `gethostbyaddr`, `getnameinfo`) and urllib /
  http.client requests, with the stack that made it. They do not see native code calling the C
  library itself: ONNX Runtime's telemetry looked its server up from its own threads (1DS, with curl).
- A network namespace of the process's own (`unshare -rn` or `unshare -n`; where the system allows
  neither, the audit hooks alone watch): every address there is local, and listeners wait on UDP
  and TCP port 53 and TCP ports 80 and 443. A name lookup sent to any resolver, or a connection to a
  web port, from any thread, native ones included, reaches them and is counted. The process then
  stays alive `LINGER` seconds more, as a ComfyUI server would, for what is sent late (ONNX Runtime's
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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINGER = 15
WATCHED = """
import json, sys, time, traceback
NETWORK_EVENTS = {
    "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "urllib.Request", "http.client.connect",
}
calls = []
def audit(event, args):
    if event in NETWORK_EVENTS:
        calls.append(f"{event}{args!r:.200}\\n" + "".join(traceback.format_stack(limit=12)[:-1]))
sys.addaudithook(audit)
"""
"""The first lines of every watched process: its audit hook, noting each network call in `calls`."""


def _unshare() -> list[str] | None:
    """The command that runs a process in a network namespace of its own, where `ip` can set it up."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for flags in ("-rn", "-n"):
        if subprocess.run(["unshare", flags, "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
            return ["unshare", flags]
    return None


UNSHARE = _unshare()


def _watched(code: str, tmp_path: Path, linger: int = LINGER, env: dict | None = None) -> dict:
    """Run `code` (which sets `status`) in a Python process of its own, watched by both witnesses
    (see the module doc), `linger` seconds more in the namespace; its exit status (`code`), what
    the audit hooks saw (`calls`) and what the listeners saw (`seen`: None without a namespace)."""
    calls = tmp_path / "calls.json"
    script = (f"{WATCHED}\n{code}\ntime.sleep({linger if UNSHARE else 0})\n"
              f"open({str(calls)!r}, 'w').write(json.dumps(calls))\nsys.exit(status)\n")
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers"), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-c", script]
    done = subprocess.run([*UNSHARE, sys.executable, __file__, *command] if UNSHARE else command,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {}), "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1]) if UNSHARE else {"code": done.returncode, "seen": None}
    return {**found, "calls": json.loads(calls.read_text()) if calls.exists() else None, "stderr": done.stderr[-3000:]}


def _offline(found: dict) -> None:
    assert found["code"] == 0, found["stderr"]
    assert found["calls"] == [], "network calls:\n" + "\n".join(found["calls"])
    assert found["seen"] in ([], None), found["seen"]


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


@pytest.mark.slow
def test_the_commands_make_no_network_call(tiny_dir, photo, lora, tmp_path):
    """`embed`, then `generate` with every feature that reads a file or a model, in one watched process."""
    embed = ["embed", "--model", str(tiny_dir), "--face", str(photo), "--out", str(tmp_path / "me.safetensors")]
    generate = ["generate", "--model", str(tiny_dir), "--face", str(photo), "--prompt", "a man smiling",
                "--steps", "2", "--length", "9", "--segments", "2", "--lora", str(lora), "--score",
                "--out", str(tmp_path / "v.mp4")]
    _offline(_watched(f"from consisid_core.cli import main\nstatus = main({embed!r}) or main({generate!r})", tmp_path))
    assert (tmp_path / "me.safetensors").is_file() and (tmp_path / "v.mp4").is_file()


LOOKUPS = """
import ctypes, socket
socket.getaddrinfo("127.0.0.1", 443, flags=socket.AI_NUMERICHOST)
answer = ctypes.c_void_p()
ctypes.CDLL(None).getaddrinfo(b"consisid-witness.example.org", b"443", None, ctypes.byref(answer))
status = 0
"""
"""Two lookups: one through Python's socket module (of a numeric address: no query leaves), one made
by the C library itself (as ONNX Runtime's telemetry made one from its own threads)."""


def test_the_witnesses_see_a_lookup(tmp_path):
    """The witnesses work: the audit hooks see the lookup made through Python, and the namespace the
    one made by native code, which the audit hooks do not see."""
    found = _watched(LOOKUPS, tmp_path, linger=0, env={"RES_OPTIONS": "timeout:1 attempts:1"})  # unanswered: short
    assert found["code"] == 0, found
    assert [call.split("(")[0] for call in found["calls"]] == ["socket.getaddrinfo"], found["calls"]
    if UNSHARE is None:
        pytest.skip("no network namespace here (unshare -n and ip): the audit hooks alone watch")
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
(faces,) = ConsisIDFaceModelsLoader().load("tiny", "cpu", "cpu")
image = torch.from_numpy(np.array(read_image(photo).convert("RGB"))).float()[None] / 255
identities, _, _ = ConsisIDFaceEmbed().embed(image, faces, -1)
(model,) = ConsisIDNativeModelLoader().load("tiny", "fp32")
text = torch.randn(1, 226, 32)
positive, negative = identity_conditioned([[text, {}]], [[text, {}]], identities[0], torch.zeros(1, 16, 1, 8, 12))
latent = torch.zeros(1, 16, 3, 8, 12)
out = comfy.sample.sample(model, torch.randn_like(latent), 2, 6.0, "ddim", "simple", positive, negative,
                          latent, seed=1, disable_pbar=True)
status = 0 if torch.isfinite(out).all() else 1
"""


@pytest.mark.slow
@pytest.mark.comfyui
def test_a_native_graph_makes_no_network_call(native_tiny_dir, photo, tmp_path):
    from native_tools import NATIVE_COGVIDEOX

    if not NATIVE_COGVIDEOX:
        pytest.skip("COMFYUI_DIR is not set, or its ComfyUI has no native CogVideoX")
    setup = (f"from pathlib import Path\nmodels, photo = Path({str(tmp_path / 'consisid')!r}), Path({str(photo)!r})\n"
             f"tiny = Path({str(native_tiny_dir)!r})\n")
    _offline(_watched(setup + NATIVE_GRAPH, tmp_path))


# ---------------------------------------------------------------------------------------------
# `python tests/core/test_offline.py COMMAND…`, run inside the namespace: listeners, then the command


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
