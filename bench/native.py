"""`python -m bench.native --size medium [--steps N]`: the native path (ConsisID as a ComfyUI MODEL,
SamplerCustomAdvanced's work with ddim + simple) against our Sampler (`ddim`) on the same random
checkpoint, same steps, one process each (run by this script), seconds per denoising step. The
native path runs twice: with the attention ComfyUI picks on a CPU (sub-quadratic) and with
--use-pytorch-cross-attention (PyTorch's SDPA, which diffusers uses).

Needs COMFYUI_DIR (a ComfyUI with native CogVideoX). Prints one Markdown table on stdout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .sizes import SIZES, build_checkpoint

ONE_RUN = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
from consisid_core.checkpoint import Checkpoint
from consisid_core.text import TextEmbeddings
from consisid_core.tiny import random_identity
folder, path, steps, frames, height, width = {folder!r}, {path!r}, {steps}, {frames}, {height}, {width}
wrapper = Checkpoint.open(folder).load_model("fp32")
g = torch.Generator().manual_seed(0)
d = wrapper.config.text_embed_dim
text = TextEmbeddings(torch.randn(1, 226, d, generator=g), torch.randn(1, 226, d, generator=g))
identity = random_identity(wrapper.config, seed=1)
stamps = []
if path == "ours":
    from consisid_core.sampling import sample
    sample(wrapper, identity, text, seed=1, steps=steps, guidance_scale=6.0, scheduler="ddim", frames=frames,
           height=height, width=width, device="cpu", callback=lambda i, n, x: stamps.append(time.perf_counter()))
else:
    from native_tools import import_comfyui
    import_comfyui(pytorch_attention=path == "native-sdpa")
    import comfy.samplers
    from consisid_pack.nodes.native.nodes import identity_conditioned, native_model
    from consisid_pack.nodes.native.comfy_parts import ReferenceNoise
    del wrapper
    model = native_model(folder, torch.float32)
    h, w, t = height // 8, width // 8, (frames - 1) // 4 + 1
    first = torch.zeros(1, 16, 1, h, w)
    positive, negative = identity_conditioned([[text.positive, {{}}]], [[text.negative, {{}}]], identity, first)
    latent = torch.zeros(1, 16, t, h, w)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    guider.sample(ReferenceNoise(1).generate_noise({{"samples": latent}}), latent, comfy.samplers.sampler_object("ddim"),
                  sigmas, seed=1, disable_pbar=True, callback=lambda *a: stamps.append(time.perf_counter()))
print(json.dumps({{"per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("medium",), default="medium",
                        help="medium (the tiny size's 32-wide heads and 4 channels are not what core's CogVideoX detects)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        parser.error("set COMFYUI_DIR to a ComfyUI source folder with native CogVideoX")
    size = SIZES[args.size]
    steps = args.steps or size.steps
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(size, Path(tmp) / size.name)
        results = {}
        for path in ("ours", "native", "native-sdpa"):
            script = ONE_RUN.format(tests=tests, threads=args.threads, folder=str(folder), path=path, steps=steps,
                                    frames=size.frames, height=size.height, width=size.width)
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the {path} run failed: {out.stderr[-2000:]}")
            results[path] = json.loads(out.stdout.strip().splitlines()[-1])["per_step"]
    print("| size | steps | path | s/step | / ours |\n|---|---|---|---|---|")
    for path, label in (("ours", "our Sampler (diffusers, SDPA)"), ("native", "native, ComfyUI's CPU attention"),
                        ("native-sdpa", "native, --use-pytorch-cross-attention")):
        print(f"| {size.name} ({size.frames} frames, {size.width}x{size.height}) | {steps} | {label} | "
              f"{results[path]:.3f} | {results[path] / results['ours']:.2f} |")


if __name__ == "__main__":
    main()
