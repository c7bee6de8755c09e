"""`python -m bench.parallel --size medium`: seconds per step with `--parallel`, against one process.

    python -m bench.parallel [--size medium] [--steps N] [--splits ulysses=2 ring=2 cfg=2 ulysses=2,cfg=2 …]
                             [--checkpoint DIR] [--out bench/RESULTS.md]

Builds the size's checkpoint once (random weights, real layout), then samples the same inputs and
seed in one process (on the CPU with all cores' threads, then with one) and under `torchrun
--standalone` for each split, each a fresh launch on this machine (gloo on the CPU, NCCL on GPUs),
each process with cores / processes threads. One table:
seconds per step (the median over steps 2 to N, so the first-frame VAE encode and the warm-up are
left out), its ratio to the one-process run measured in the same invocation, and the max |Δ| of
the latents against it. `--out` writes the table into that file's `parallel-SIZE` section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_SPLITS = ("ulysses=2", "ring=2", "cfg=2", "ulysses=2,cfg=2", "ring=2,cfg=2")


def _parser() -> argparse.ArgumentParser:
    from .sizes import SIZES

    p = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--steps", type=int, help="sampling steps (default: the size's)")
    p.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="--parallel values, one launch each")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", type=Path, help="build the checkpoint here, or reuse the one already here")
    p.add_argument("--out", type=Path, help="also write the table into this markdown file")
    p.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "SPLIT", "RESULT"), help=argparse.SUPPRESS)
    return p


def worker(args, checkpoint: Path, split: str, result: Path) -> None:
    """One process of a measured run (under torchrun when `split` is not "none")."""
    from consisid_core import parallel
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.sampling import sample

    from .contenders import make_inputs
    from .sizes import SIZES

    size = SIZES[args.size]
    spec = None if split == "none" else parallel.Parallel.parse(split)
    device = torch.device(args.device)
    if spec is not None:
        device = parallel.rank_device(spec, device, False)
        parallel.start(device)
    dtype = "fp32" if device.type == "cpu" else "bf16"
    model = Checkpoint.open(checkpoint).load_model(dtype)
    steps = args.steps or size.steps
    inputs = make_inputs(checkpoint, steps, size.frames, size.height, size.width)
    times = [time.perf_counter()]
    latents = sample(
        model, inputs.identity, inputs.text, steps=steps, seed=42, length=size.frames, height=size.height,
        width=size.width, device=device, parallel=spec, callback=lambda done, total, latents: times.append(time.perf_counter()),
    )
    if parallel.is_writer():
        torch.save(latents, result.with_suffix(".pt"))
        result.write_text(json.dumps({"steps": [b - a for a, b in zip(times, times[1:])]}))
    if spec is not None:
        parallel.finish()


def _launch(args, checkpoint: Path, split: str, result: Path, threads: int) -> None:
    processes = 1 if split == "none" else _world(split)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore::FutureWarning"}
    command = [sys.executable, "-m", "bench.parallel", "--size", args.size, "--device", args.device,
               *(["--steps", str(args.steps)] if args.steps else []), "--worker", str(checkpoint), split, str(result)]
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "bench.parallel"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent, env=env)
    if done.returncode:
        raise SystemExit(f"{split}: exit {done.returncode}\n{done.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    from .__main__ import environment
    from .report import write_section
    from .sizes import SIZES, build_checkpoint

    args = _parser().parse_args(argv)
    if args.worker:
        worker(args, Path(args.worker[0]), args.worker[1], Path(args.worker[2]))
        return 0
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        checkpoint = args.checkpoint or Path(tmp) / "checkpoint"
        if not (checkpoint / "model_index.json").exists():
            build_checkpoint(size, checkpoint)
        rows, single = [], None
        cores = (os.cpu_count() or 1) if args.device == "cpu" else 1
        # the one-process run with every core's thread, then with one (on the CPU): spinning OpenMP
        # threads fare badly on shared cores, one thread a process does not
        runs = [("none", cores), *([("none", 1)] if cores > 1 else []),
                *((split, max(1, cores // _world(split))) for split in args.splits)]
        for split, threads in runs:
            result = Path(tmp) / f"{split}-{threads}.json"
            _launch(args, checkpoint, split, result, threads)
            steps = json.loads(result.read_text())["steps"]
            latents = torch.load(result.with_suffix(".pt"), weights_only=True)
            per_step = statistics.median(steps[1:])
            if single is None:
                single = (per_step, latents)
            delta = (latents - single[1]).abs().max().item()
            processes = 1 if split == "none" else _world(split)
            rows.append(f"| {processes} | {threads} | {split if split != 'none' else 'one process'} | {per_step:.2f} | "
                        f"{per_step / single[0]:.2f} | {delta:.1e} |")
    steps = args.steps or size.steps
    text = "\n".join([
        f"### parallel-{size.name}: {steps} steps, {size.frames} frames at {size.width}×{size.height}, one launch each",
        "",
        f"`python -m bench.parallel --size {size.name}` on {datetime.date.today().isoformat()}",
        "",
        *(f"- {line}" for line in environment(torch.device(args.device), torch.float32 if args.device == "cpu" else torch.bfloat16)),
        "- each process: cores / processes torch threads (at least 1), and the one-process run once more with one "
        "thread; s/step = median of steps 2 to N; ÷ one process: against the first row",
        "",
        "| processes | threads each | --parallel | s/step | ÷ one process | max \\|Δ\\| latents |",
        "|---:|---:|---|---:|---:|---:|",
        *rows,
    ])
    print(text)
    if args.out:
        write_section(args.out, f"parallel-{size.name}", text)
    return 0


def _world(split: str) -> int:
    from consisid_core.parallel import Parallel

    return Parallel.parse(split).world_size


if __name__ == "__main__":
    sys.exit(main())
