"""`python -m bench.native --size medium [--steps N] [--what speed|cache] [--checkpoint DIR] [--out FILE]`:
the native path (ConsisID as a ComfyUI MODEL, SamplerCustomAdvanced's work with ddim + simple) on
the same random checkpoint, inputs and first-frame latent, same steps, one process per row (run by
this script): seconds per denoising step (steps 2 to N), wall-clock and the process's CPU time. On a
CPU shared with other work the wall time grows with that work and the CPU time far less; with
`--threads 1` (no threads waiting on each other) the CPU time is the steadiest measure.

- `speed` (section native-SIZE): against our Sampler (`ddim`); the native path as it runs by default
  (on a CPU the MODEL attends with PyTorch's SDPA, as diffusers, where ComfyUI would pick its
  sub-quadratic attention), and with --use-quad-cross-attention (ComfyUI's sub-quadratic attention,
  asked for); the latents' max |Δ| against our Sampler's.
- `cache` (section native-cache-SIZE): ConsisID Step Cache at ConsisID Performance's thresholds
  against core's EasyCache (its defaults, and the same thresholds), each against the uncached
  native run: steps skipped, s/step, max |Δ| of the latents.

Needs COMFYUI_DIR (a ComfyUI with native CogVideoX). Prints one Markdown table on stdout."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .report import write_section
from .sizes import SIZES, build_checkpoint

ONE_RUN = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
from consisid_core.checkpoint import Checkpoint
from consisid_core.text import TextEmbeddings
from consisid_core.tiny import random_identity
folder, path, patch, steps, frames, height, width = {folder!r}, {path!r}, {patch!r}, {steps}, {frames}, {height}, {width}
wrapper = Checkpoint.open(folder).load_model("fp32")
g = torch.Generator().manual_seed(0)
d = wrapper.config.text_embed_dim
text = TextEmbeddings(torch.randn(1, 226, d, generator=g), torch.randn(1, 226, d, generator=g))
identity = random_identity(wrapper.config, seed=1)
stamps, skipped = [], None
def stamp(*_):
    stamps.append((time.perf_counter(), time.process_time()))
if path == "ours":
    from consisid_core.sampling import sample
    out = sample(wrapper, identity, text, seed=1, steps=steps, cfg=6.0, scheduler="ddim", length=frames,
                 height=height, width=width, device="cpu", callback=lambda i, n, x: stamp())
    out = out.permute(0, 2, 1, 3, 4) / wrapper.vae.config.scaling_factor  # the native LATENT's layout and scale
else:
    from native_tools import import_comfyui
    import_comfyui()
    import comfy.cli_args
    import comfy.samplers
    comfy.cli_args.args.use_quad_cross_attention = path == "native-subquad"
    from consisid_pack.nodes.native.nodes import identity_conditioned, native_model
    from consisid_pack.nodes.native.comfy_parts import ReferenceNoise, with_step_cache
    from consisid_core.sampling import _pipeline, first_frame, make_scheduler
    # the first frame's latent as our Sampler makes it (the VAE posterior sampled from the seed's generator)
    pipe = _pipeline(wrapper.vae, scheduler=make_scheduler(wrapper, "ddim"))
    image = pipe.video_processor.preprocess(first_frame(None, identity), height=height, width=width)
    _, first = pipe.prepare_latents(image.float(), 1, 16, frames, height, width, torch.float32, torch.device("cpu"),
                                    torch.Generator("cpu").manual_seed(1), None)
    first = first[:, :1].permute(0, 2, 1, 3, 4) / wrapper.vae.config.scaling_factor
    del wrapper, pipe
    model = native_model(folder, torch.float32)
    if patch:
        kind, threshold = patch.split(":")
        if kind == "step_cache":
            model = with_step_cache(model, float(threshold))
        else:
            from comfy_extras.nodes_easycache import EasyCacheNode
            model = EasyCacheNode.execute(model, float(threshold), 0.15, 0.95, False).result[0]
    h, w, t = height // 8, width // 8, (frames - 1) // 4 + 1
    positive, negative = identity_conditioned([[text.positive, {{}}]], [[text.negative, {{}}]], identity, first)
    latent = torch.zeros(1, 16, t, h, w)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    calls = []
    core = model.model.diffusion_model
    counting = core.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    out = guider.sample(ReferenceNoise(1).generate_noise({{"samples": latent}}), latent,
                        comfy.samplers.sampler_object("ddim"), sigmas, seed=1, disable_pbar=True,
                        callback=stamp)
    counting.remove()
    skipped = steps - len(calls)
torch.save(out, {latents!r})
steps_timed = len(stamps) - 1  # from the end of step 1 on: steps 2 to N, each path's warm-up left out
print(json.dumps({{"wall": (stamps[-1][0] - stamps[0][0]) / steps_timed, "cpu": (stamps[-1][1] - stamps[0][1]) / steps_timed,
                  "skipped": skipped}}))
"""

SPEED = (("ours", "", "our Sampler (diffusers, SDPA)"), ("native", "", "native (SDPA on a CPU)"),
         ("native-subquad", "", "native, --use-quad-cross-attention (ComfyUI's sub-quadratic)"))
CACHE = (("native", "", "native, no cache"),) + tuple(
    ("native", f"{kind}:{threshold}", f"{label} {threshold}")
    for kind, label in (("step_cache", "ConsisID Step Cache"), ("easycache", "core EasyCache"))
    for threshold in (0.1, 0.2, 1.0)
)
"""(path, patch, label) of each row; EasyCache with its node's defaults otherwise (start 0.15, end 0.95)."""


def _run(args, size, folder: Path, tmp: Path, row: int, path: str, patch: str, steps: int) -> dict:
    latents = tmp / f"latents{row}.pt"
    script = ONE_RUN.format(tests=str(Path(__file__).resolve().parents[1] / "tests"), threads=args.threads,
                            folder=str(folder), path=path, patch=patch, steps=steps, frames=size.frames,
                            height=size.height, width=size.width, latents=str(latents))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the {path} {patch} run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"latents": torch.load(latents, weights_only=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("medium",), default="medium",
                        help="medium (the tiny size's 32-wide heads and 4 channels are not what core's CogVideoX detects)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--what", choices=("speed", "cache"), default="speed")
    parser.add_argument("--checkpoint", type=Path, help="build the checkpoint here once, and reuse it")
    parser.add_argument("--out", type=Path, help="also write the table into this file's section")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        parser.error("set COMFYUI_DIR to a ComfyUI source folder with native CogVideoX")
    size = SIZES[args.size]
    steps = args.steps or size.steps
    rows = SPEED if args.what == "speed" else CACHE
    with tempfile.TemporaryDirectory() as tmp:
        target = args.checkpoint or Path(tmp) / size.name
        folder = target if (target / "model_index.json").is_file() else build_checkpoint(size, target)
        results = [_run(args, size, folder, Path(tmp), i, path, patch, steps) for i, (path, patch, _) in enumerate(rows)]
    base = results[0]
    lines = [f"`COMFYUI_DIR=… python -m bench.native --size {size.name} --what {args.what} --threads {args.threads} "
             f"--steps {steps}` on {datetime.date.today()}: {size.frames} frames of {size.width}×{size.height}, ddim, "
             f"CFG 6, fp32 on the CPU, one process per row, load average {os.getloadavg()[0]:.1f} at the end", "",
             f"| path | steps skipped | s/step (wall) | CPU s/step | ÷ {rows[0][2]} (CPU) | max \\|Δ\\| latents vs {rows[0][2]} |",
             "|---|---:|---:|---:|---:|---:|"]
    for (_, _, label), result in zip(rows, results):
        skipped = "—" if result["skipped"] is None else f"{result['skipped']} of {steps}"
        diff = (result["latents"] - base["latents"]).abs().max().item()
        lines.append(f"| {label} | {skipped} | {result['wall']:.2f} | {result['cpu']:.2f} | "
                     f"{result['cpu'] / base['cpu']:.2f} | {diff:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        title = {"speed": "the native path against our Sampler", "cache": "ConsisID Step Cache against core EasyCache"}
        write_section(args.out, f"native-{'cache-' if args.what == 'cache' else ''}{size.name}",
                      f"### native{'-cache' if args.what == 'cache' else ''}-{size.name}: {title[args.what]}\n\n{text}")


if __name__ == "__main__":
    main()
