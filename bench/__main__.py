"""`python -m bench --size tiny|medium|real`: our path against diffusers' ConsisIDPipeline, one table.

    python -m bench --size medium [--steps N] [--repeats N] [--modes tiling,cache-0.1,…]
                    [--length F --height H --width W] [--dtype fp32|bf16|fp16] [--device cpu|cuda]
                    [--text embeddings|t5] [--checkpoint DIR] [--out bench/RESULTS.md]

The checkpoint is written (random weights, real layout) into a temporary folder, or into / read
from `--checkpoint DIR` so a large one is built once. `--out FILE` also writes the table into FILE,
replacing that size's section (between `<!-- bench:SIZE -->` markers) or appending it; with
`--text t5` the section is SIZE-t5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from consisid_core.checkpoint import DTYPES
from consisid_core.cli import renamed_option, warn_renamed
from consisid_core.sampling import resolve_size

from .contenders import MODES, default_modes, make_inputs
from .harness import quiet_diffusers, run_bench
from .report import table, write_section
from .sizes import (
    SIZES, TEXT_MODES, build_checkpoint, folder_megabytes, t5_config, t5_parameters, transformer_parameters,
)

logger = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, help="sampling steps (default: the size's)")
    p.add_argument("--repeats", type=int, help="alternating repeats of each path (default: the size's)")
    renamed_option(p, "--length", "--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when there is one)")
    p.add_argument(
        "--modes",
        help=f"comma-separated, or 'none' (default: all that apply on the device; known: {', '.join(MODES)})",
    )
    p.add_argument(
        "--text", choices=TEXT_MODES, default="embeddings",
        help="embeddings: both paths get the same precomputed text embeddings (the checkpoint's T5 is small, "
        "never run); t5: both encode the same prompts with a T5 of the released share of the parameters "
        "(0.95 x the transformer's; tiny keeps its tiny T5)",
    )
    p.add_argument("--checkpoint", type=Path, help="build the checkpoint here, or reuse the one already here")
    p.add_argument("--out", type=Path, help="also write the table into this markdown file (its size's section)")
    return p


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> list[str]:
    import diffusers
    import transformers

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
        f"CPU: {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}",
    ]
    if hasattr(os, "getloadavg"):
        lines[-1] += f", load average {os.getloadavg()[0]:.2f} at start"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    lines.append(f"device {device}, dtype {str(dtype).removeprefix('torch.')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    warn_renamed(args, logger)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)


def _run(args) -> int:
    size = SIZES[args.size]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size.gpu_only and device.type != "cuda":
        sys.stderr.write(
            f"error: --size {size.name} builds the real ConsisID architecture (about 5B parameters) and needs a GPU; "
            "this machine has none (or --device is cpu). Use --size medium on a CPU.\n"
        )
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = default_modes(device) if args.modes is None else [m for m in args.modes.split(",") if m and m != "none"]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.stderr.write(f"error: unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}\n")
        return 2
    steps = args.steps or size.steps
    repeats = args.repeats or size.repeats
    try:
        frames, height, width = resolve_size(
            size.transformer, {"block_out_channels": size.vae.get("block_out_channels", (128, 256, 256, 512)),
                               "temporal_compression_ratio": size.vae.get("temporal_compression_ratio", 4)},
            args.length or size.frames, args.height or size.height, args.width or size.width,
        )
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if steps < 1 or repeats < 1:
        sys.stderr.write("error: --steps and --repeats must be at least 1\n")
        return 2

    env = environment(device, dtype)
    for line in env:
        logger.info("%s", line)
    with _CheckpointFolder(args.checkpoint) as folder, quiet_diffusers():
        if not (folder / "model_index.json").is_file():
            logger.info("building the %s checkpoint: %s", size.name, size.describe())
            build_checkpoint(size, folder, dtype=dtype, device=device, text=args.text)
        t5 = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        wanted = t5_config(size, args.text, t5["vocab_size"])
        if any(t5.get(k) != v for k, v in wanted.items() if k in ("d_ff", "num_layers", "num_heads", "d_kv")):
            sys.stderr.write(
                f"error: the T5 in '{folder}' (d_ff {t5.get('d_ff')}, {t5.get('num_layers')} layers) is not the one "
                f"--size {size.name} --text {args.text} builds (d_ff {wanted['d_ff']}, {wanted['num_layers']} layers): "
                "give another --checkpoint folder\n"
            )
            return 2
        megabytes = folder_megabytes(folder)
        inputs = make_inputs(folder, steps, frames, height, width, args.text)
        results = run_bench(folder, inputs, dtype, device, repeats, modes)
    t5_params = t5_parameters(
        vocab=t5["vocab_size"],
        **{k: t5[k] for k in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "relative_attention_num_buckets")},
    )
    transformer_params = transformer_parameters(size)
    if args.text == "t5":
        text_line = (
            f"- text: both paths encode the same prompt and negative prompt with the checkpoint's T5 (random weights, "
            f"width {t5['d_model']}, {t5['num_heads']} heads × {t5['d_kv']}, gated GELU, d_ff {t5['d_ff']}, "
            f"{t5['num_layers']} layer{'s' if t5['num_layers'] > 1 else ''}: {t5_params:,} parameters, "
            f"{t5_params / transformer_params:.2f} × the transformer's {transformer_params:,}; the released "
            "T5-XXL encoder is 4.76 B against ≈5 B, 0.95). Ours: `encode_with_checkpoint` (load T5, encode, "
            "release), then `load_model` → `sample` → `decode`, as the CLI; diffusers: `from_pretrained` (T5 "
            "included), then `pipe(prompt=..., negative_prompt=...)`, so its T5 stays loaded for the whole run"
        )
    else:
        text_line = (
            "- text: precomputed random embeddings [1, 226, "
            f"{size.transformer['text_embed_dim']}] given to both paths; diffusers' from_pretrained also loads the "
            "checkpoint's (small, random, never run) T5, which our path does not load"
        )
    section = size.name if args.text == "embeddings" else f"{size.name}-t5"
    report = "\n".join(
        [
            f"### {section}: {steps} steps, {frames} frames at {width}×{height}, {repeats} alternating repeats",
            "",
            f"`python -m bench --size {size.name}"
            + (f" --steps {steps}" if args.steps else "")
            + (f" --repeats {repeats}" if args.repeats else "")
            + (f" --modes {args.modes}" if args.modes else "")
            + (f" --text {args.text}" if args.text != "embeddings" else "")
            + f"` on {datetime.date.today().isoformat()}",
            "",
            *[f"- {line}" for line in env],
            f"- checkpoint: {size.describe()} ({size.note}); {megabytes:,.0f} MB on disk",
            text_line,
            "",
            table(results, steps),
            "",
        ]
    )
    sys.stdout.write(report + "\n")
    if args.out:
        write_section(args.out, section, report)
        logger.info("wrote the %s section of %s", section, args.out)
    return 0


class _CheckpointFolder:
    """`folder` as given (created if need be), or a temporary folder removed afterwards."""

    def __init__(self, folder: Path | None):
        self.folder, self._tmp = folder, None

    def __enter__(self) -> Path:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self.folder
        self._tmp = tempfile.TemporaryDirectory(prefix="consisid-bench-")
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
