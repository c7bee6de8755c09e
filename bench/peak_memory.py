"""Whole-run peak memory, each path in a fresh process: `python -m bench.peak_memory`.

The main bench runs both paths in one process, where memory-mapped weight files and the
allocator's leftovers from one path blur the other's whole-run peak. Here each run is its own
process: it imports both stacks, resets the kernel's high-water mark (VmHWM), then does one whole
generation the way each path is used and reports the peak RSS above that start:

- ours: the CLI itself (`python -m consisid_core generate`: T5 loaded, used, released →
  `load_model` → `sample` → the transformer released → `decode(vae)` → PNG frames);
- diffusers: `ConsisIDPipeline.from_pretrained` → `pipe(prompt=..., output_type="pt")`.

Paths alternate; the table gives medians and the ours/diffusers ratio. CPU only (on a GPU the
main bench's max_memory_allocated rows are the ones to read).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT, NEGATIVE = "a woman smiling in a sunny park, the camera slowly moves closer", "blurry, low quality"
STEPS, SEED = 2, 42


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) // 1024


def _worker(path: str, folder: str, frames: int, height: int, width: int) -> None:
    import torch
    from diffusers import ConsisIDPipeline

    from consisid_core import Checkpoint, cli
    from consisid_core.identity import save_identity
    from consisid_core.tiny import random_identity

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = _status("VmRSS")
    identity = random_identity(Checkpoint.open(folder).transformer_config, 1, face_size=512)
    if path == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            identity_file = save_identity(identity, Path(tmp) / "identity.safetensors")
            code = cli.main([
                "generate", "--model", folder, "--identity", str(identity_file), "--prompt", PROMPT,
                "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--seed", str(SEED), "--length", str(frames),
                "--height", str(height), "--width", str(width), "--device", "cpu", "--dtype", "fp32",
                "--out", str(Path(tmp) / "frames"),
            ])
            assert code == 0
            frames_out = [len(list((Path(tmp) / "frames").iterdir())), height, width, 3]
    else:
        pipe = ConsisIDPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        frames_out = pipe(
            image=identity.face_image_pil(), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            height=height, width=width, num_frames=frames, id_cond=identity.id_cond,
            id_vit_hidden=list(identity.id_vit_hidden), kps_cond=identity.kps.numpy(),
            generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt",
        ).frames[0].permute(0, 2, 3, 1).shape
    result = {"peak_mb": _status("VmHWM") - start, "frames": list(frames_out), "pid": os.getpid()}
    sys.stdout.write(json.dumps(result) + "\n")


def measure(path: str, folder: Path, size) -> dict:
    """One whole generation by `path` ("ours" or "diffusers") in a fresh process: its peak RSS above
    the start (`peak_mb`), the frames it made (`frames`: [F, H, W, 3]) and its process id (`pid`)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.peak_memory", "--worker", path, str(folder),
         str(size.frames), str(size.height), str(size.width)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "medium"), default="medium")
    parser.add_argument("--text", choices=("embeddings", "t5"), default="t5", help="the checkpoint's T5 (see bench/sizes.py)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="a folder built for this size and text (built if empty)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        path, folder, frames, height, width = args.worker
        _worker(path, folder, int(frames), int(height), int(width))
        return 0

    from .sizes import SIZES, build_checkpoint

    size = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="consisid-peak-") as tmp:
        folder = args.checkpoint or Path(tmp) / "checkpoint"
        if not (folder / "model_index.json").is_file():
            build_checkpoint(size, folder, text=args.text)
        peaks: dict[str, list[int]] = {"ours": [], "diffusers": []}
        for repeat in range(args.repeats):
            for path in (("ours", "diffusers") if repeat % 2 == 0 else ("diffusers", "ours")):
                peaks[path].append(measure(path, folder, size)["peak_mb"])
    ours, theirs = statistics.median(peaks["ours"]), statistics.median(peaks["diffusers"])
    sys.stdout.write(
        f"### {args.size}, text {args.text}: whole-run peak RSS, each run in a fresh process "
        f"({size.frames} frames at {size.width}×{size.height}, {STEPS} steps, median of {args.repeats})\n\n"
        "| metric | ours | diffusers | ours/diffusers |\n|---|---:|---:|---:|\n"
        f"| whole-run peak RSS MB (above the start, both stacks imported) | {ours:,.0f} | {theirs:,.0f} | "
        f"{ours / theirs:.2f} |\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
