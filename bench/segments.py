"""Peak memory of long videos: `python -m bench.segments [--size medium] [--segments 1,2,4]`.

Each run is the CLI itself in a fresh process (`python -m consisid_core generate --segments N`,
as `bench.peak_memory` measures one pass): it imports the stack, resets the kernel's high-water
mark (VmHWM), makes an N-segment video into a PNG frame folder and reports the peak RSS above that
start. Every segment is decoded and written as soon as it is sampled, so the peak should not grow
with N; the table also gives the size of the whole video as float32 frames, what holding all the
segments until the end would add. CPU only.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

from .report import write_section
from .peak_memory import NEGATIVE, PROMPT, SEED, STEPS, _status

SECTION = "segments-memory"


def _worker(folder: str, segments: int, frames: int, height: int, width: int) -> None:
    from consisid_core import Checkpoint, cli
    from consisid_core.identity import save_identity
    from consisid_core.tiny import random_identity

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = _status("VmRSS")
    identity = random_identity(Checkpoint.open(folder).transformer_config, 1, face_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        identity_file = save_identity(identity, Path(tmp) / "identity.safetensors")
        out = Path(tmp) / "frames"
        code = cli.main([
            "generate", "--model", folder, "--identity", str(identity_file), "--prompt", PROMPT,
            "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--seed", str(SEED), "--segments", str(segments),
            "--length", str(frames), "--height", str(height), "--width", str(width),
            "--device", "cpu", "--dtype", "fp32", "--out", str(out),
        ])
        assert code == 0
        written = len(list(out.iterdir()))
    sys.stdout.write(json.dumps({"peak_mb": _status("VmHWM") - start, "frames": written}) + "\n")


def _run(folder: Path, segments: int, size) -> dict:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "bench.segments", "--worker", str(folder), str(segments),
         str(size.frames), str(size.height), str(size.width)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.segments", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "medium"), default="medium")
    parser.add_argument("--segments", default="1,2,4", help="comma-separated segment counts")
    parser.add_argument("--checkpoint", type=Path, help="a folder built for this size (built if empty)")
    parser.add_argument("--out", type=Path, help="also write the table into this markdown file (its section)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, *numbers = args.worker
        _worker(folder, *map(int, numbers))
        return 0

    import datetime

    from .sizes import SIZES, build_checkpoint

    size = SIZES[args.size]
    counts = [int(n) for n in args.segments.split(",") if n]
    rows = []
    with tempfile.TemporaryDirectory(prefix="consisid-segments-") as tmp:
        folder = args.checkpoint or Path(tmp) / "checkpoint"
        if not (folder / "model_index.json").is_file():
            build_checkpoint(size, folder)
        for count in counts:
            result = _run(folder, count, size)
            assert result["frames"] == count * size.frames - (count - 1), result
            video_mb = result["frames"] * size.height * size.width * 3 * 4 / 2**20
            rows.append(f"| {count} | {result['frames']} | {result['peak_mb']:,.0f} | {video_mb:,.0f} |")
    report = "\n".join([
        f"### {SECTION}: long videos, whole-run peak RSS by segment count ({args.size}, {size.frames} frames of "
        f"{size.width}×{size.height} per segment, {STEPS} steps, fp32 on the CPU)",
        "",
        f"`python -m bench.segments --size {args.size} --segments {args.segments}` on "
        f"{datetime.date.today().isoformat()}: the CLI (`generate --segments N`, PNG frames) in a fresh process each",
        "",
        "| segments | frames | peak RSS MB (above the start) | the whole video as float32 frames, MB |",
        "|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    sys.stdout.write(report + "\n")
    if args.out:
        write_section(args.out, SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
