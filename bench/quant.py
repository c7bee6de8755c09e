"""`python -m bench.quant --size tiny|medium [--steps N] [--formats a,b] [--out bench/RESULTS.md]`:
ConsisID in ComfyUI core's quantized formats against full precision, on the CPU.

A random checkpoint of the size is exported (`python -m consisid_core export`) once in fp32, once
in bf16 and once per format (`--quant`). Each file then runs in a fresh process the way the low-VRAM
workflow runs it: core's Load Diffusion Model call (`comfy.sd.load_diffusion_model`), ConsisID Face
Modules, Identity Conditioning, CFG 6 with ddim and the simple schedule from ConsisID Noise's seed
(KSampler's work), one process each, timed per step, with its peak RSS above the start while
loading and sampling (VmHWM reset at the start). The latents are decoded by the checkpoint's VAE
(the same for all), and the frames compared with fp32's (max and mean |Δ|, 0..1 pixels) and
scored with `python -m consisid_core score` against the identity's recognition embedding (make-tiny's
face models: the bench's checkpoints have none).

Needs COMFYUI_DIR (a ComfyUI with native CogVideoX and core's quantized formats, v0.33.0) and is
run with that ComfyUI's Python. Prints a Markdown table; `--out` writes it into a file's
`<!-- bench:quant-SIZE -->` section.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from consisid_core import native, quant
from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main as cli
from consisid_core.identity import save_identity
from consisid_core.media import write_frames
from consisid_core.sampling import decode
from consisid_core.tiny import TINY_TRANSFORMER, TINY_VAE, make_tiny, random_identity

from .report import write_section
from .sizes import SIZES, Size, build_checkpoint

TINY = Size(
    "tiny",
    transformer=dict(TINY_TRANSFORMER, num_attention_heads=4, attention_head_dim=64, in_channels=32, out_channels=16,
                     time_embed_dim=256, LFE_output_dim=170),
    vae=dict(TINY_VAE, latent_channels=16),
    frames=9, height=64, width=96, steps=4, repeats=1,
    note="make-tiny's transformer with 4 heads of 64, 256-wide time embedding, 32 → 16 channels (what core's "
         "CogVideoX detection reads, and every format's block size divides)",
)
QUANT_SIZES = {"tiny": TINY, "medium": SIZES["medium"]}
REFERENCES = {"fp32": "fp32", "bf16": "bf16"}
"""Full-precision exports: the variant name → `export --dtype`."""
SEED, CFG = 1, 6.0

WORKER = r"""
import gc, json, re, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
from native_tools import import_comfyui
import_comfyui()
import comfy.samplers, comfy.sd
from safetensors.torch import load_file, save_file
from consisid_core import native
from consisid_core.face_layers import face_layers
from consisid_core.identity import load_identity
from consisid_pack.nodes.native import comfy_parts
from consisid_pack.nodes.native.comfy_parts import ReferenceNoise
from consisid_pack.nodes.native.nodes import identity_conditioned
status = lambda field: int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
text, identity = load_file({text!r}), load_identity({identity!r})
h, w, t = {height} // 8, {width} // 8, ({frames} - 1) // 4 + 1
gc.collect()
Path("/proc/self/clear_refs").write_text("5")
start = status("VmRSS")
model = comfy.sd.load_diffusion_model({transformer!r})
weights, info = native.read_face_file({face!r})
model = comfy_parts.with_face_layers(model, face_layers(weights, info["config"]), info["latent_channels"],
                                      info["scaling_factor"], info["scheduler"])
channels = info["latent_channels"]
positive, negative = identity_conditioned([[text["positive"], {{}}]], [[text["negative"], {{}}]], identity,
                                          torch.zeros(1, channels, 1, h, w))
latent = torch.zeros(1, channels, t, h, w)
guider = comfy.samplers.CFGGuider(model)
guider.set_conds(positive, negative)
guider.set_cfg({cfg})
sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", {steps})
stamps = [time.perf_counter()]
out = guider.sample(ReferenceNoise({seed}).generate_noise({{"samples": latent}}), latent,
                    comfy.samplers.sampler_object("ddim"), sigmas, seed={seed}, disable_pbar=True,
                    callback=lambda *a: stamps.append(time.perf_counter()))
peak = status("VmHWM") - start
save_file({{"latent": out.contiguous()}}, {latent_file!r})
print(json.dumps({{"per_step": (stamps[-1] - stamps[1]) / (len(stamps) - 2), "peak_mb": peak}}))
"""


def export_variants(folder: Path, out: Path, formats: list[str]) -> dict[str, tuple[Path, Path]]:
    """Each variant's (transformer, face layers) files, as `export` writes them."""
    files = {}
    for variant, dtype in REFERENCES.items():
        files[variant] = native.export(folder, out, variant, dtype=native.EXPORT_DTYPES[dtype])
    for name in formats:
        files[name] = native.export(folder, out, name, quant=name)
    return files


def run_worker(size: Size, steps: int, threads: int, files: tuple[Path, Path], inputs: dict[str, Path],
               latent_file: Path) -> dict:
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    script = WORKER.format(tests=tests, threads=threads, transformer=str(files[0]), face=str(files[1]),
                           text=str(inputs["text"]), identity=str(inputs["identity"]), height=size.height,
                           width=size.width, frames=size.frames, steps=steps, cfg=CFG, seed=SEED,
                           latent_file=str(latent_file))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the run of {files[0].name} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def identity_score(score_models: Path, identity: Path, video: Path) -> float:
    """FaceSim-Arc as `python -m consisid_core score --json -` gives it."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli(["score", "--model", str(score_models), "--identity", str(identity), "--video", str(video),
                    "--json", "-"])
    if code:
        sys.exit(f"score failed on {video}")
    return json.loads(stdout.getvalue())["facesim_arc"]


def make_inputs(folder: Path) -> dict[str, Path]:
    """The run's text embeddings and identity files, and what `score` takes: make-tiny's checkpoint
    (its face models) and an identity for it that carries the run identity's recognition embedding
    (the 512 values of id_cond the score compares; the rest fits make-tiny's face models)."""
    config = Checkpoint.open(folder).transformer_config
    g = torch.Generator().manual_seed(0)
    width = config["text_embed_dim"]
    text = {"positive": torch.randn(1, 226, width, generator=g), "negative": torch.randn(1, 226, width, generator=g)}
    save_file(text, folder.parent / "text.safetensors")
    run = random_identity(config, seed=3)
    identity = save_identity(run, folder.parent / "identity.safetensors")
    score_models = make_tiny(folder.parent / "score_models")
    scored = random_identity(Checkpoint.open(score_models).transformer_config, seed=3)
    scored = replace(scored, id_cond=torch.cat([run.id_cond[:, :512], scored.id_cond[:, 512:]], dim=1))
    return {"text": folder.parent / "text.safetensors", "identity": identity, "score_models": score_models,
            "score_identity": save_identity(scored, folder.parent / "score_identity.safetensors")}


def measure(size: Size, steps: int, threads: int, formats: list[str], work: Path) -> dict[str, dict]:
    folder = build_checkpoint(size, work / size.name)
    inputs = make_inputs(folder)
    files = export_variants(folder, work, formats)
    vae = Checkpoint.open(folder).load_vae("fp32")
    scaling = vae.config.scaling_factor
    results, reference = {}, None
    for variant, pair in files.items():
        result = run_worker(size, steps, threads, pair, inputs, work / f"{variant}.latent.safetensors")
        latent = load_file(work / f"{variant}.latent.safetensors")["latent"]
        frames = decode(vae, (latent * scaling).permute(0, 2, 1, 3, 4), "cpu")
        reference = frames if reference is None else reference
        video = write_frames(frames, work / f"{variant}_frames")
        result |= {"file_mb": pair[0].stat().st_size / 2**20, "max_delta": (frames - reference).abs().max().item(),
                   "mean_delta": (frames - reference).abs().mean().item(),
                   "score": identity_score(inputs["score_models"], inputs["score_identity"], video)}
        results[variant] = result
        print(f"{variant}: {result}", file=sys.stderr)
    return results


def table(size: Size, steps: int, threads: int, results: dict[str, dict]) -> str:
    base = results["fp32"]
    lines = [
        f"### quant-{size.name}: ConsisID in ComfyUI core's quantized formats against full precision ({size.name}, "
        f"{size.frames} frames of {size.width}×{size.height}, {steps} steps of ddim, CFG {CFG:g}, on the CPU)",
        "",
        f"`COMFYUI_DIR=<ComfyUI v0.33.0> python -m bench.quant --size {size.name} --steps {steps}` on "
        f"{date.today().isoformat()}: each file in a fresh process ({threads} threads) through core's Load Diffusion "
        f"Model, ConsisID Face Layers and Identity Conditioning, sampled from the same seed; frames decoded by the "
        f"checkpoint's VAE and compared with fp32's (0..1); FaceSim-Arc by `python -m consisid_core score` with "
        f"make-tiny's face models against the identity's recognition embedding. {size.describe()}.",
        "",
        "| weights | bits | transformer file MB | ÷ fp32 | peak RSS MB (load + sample) | ÷ fp32 | s/step | ÷ fp32 | "
        "frames max abs Δ | mean abs Δ | FaceSim-Arc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, r in results.items():
        bits = {"fp32": 32, "bf16": 16}.get(variant) or quant.FORMATS[variant].bits
        lines.append(
            f"| {variant} | {bits} | {r['file_mb']:,.1f} | {r['file_mb'] / base['file_mb']:.2f} | {r['peak_mb']:,.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.2f} | {r['per_step']:.3f} | {r['per_step'] / base['per_step']:.2f} | "
            f"{r['max_delta']:.4f} | {r['mean_delta']:.5f} | {r['score']:.4f} |")
    return "\n".join(lines) + "\n"


SAMPLING_REST_GB = 0.44 + 2.82
"""Besides the transformer and its face layers, on the GPU while sampling at the real size: the VAE
(0.44 GB, bf16) and the activations of a guided forward (2.82 GB), from `python -m bench.gpu_memory
--size real --dtype bf16` (bench/RESULTS.md, real-gpu-memory-estimate)."""


def real_estimate(formats: list[str]) -> str:
    """GPU memory while sampling at the real size (ConsisID-preview's architecture) in bf16 and each
    format: the exported transformer's bytes (each distinct layer shape quantized once, random
    weights, times its count), the face layers in bf16, plus `SAMPLING_REST_GB`."""
    from diffusers import ConsisIDTransformer3DModel

    config = {k: v for k, v in SIZES["real"].transformer.items() if not k.startswith("_")}
    with torch.device("meta"):
        state = ConsisIDTransformer3DModel(**config).state_dict()
    core, face = native.split_weights(state)
    chosen = [k for k in core if quant.QUANTIZED_LAYERS.fullmatch(k) and k != quant.KEPT]
    shapes = {tuple(core[k].shape): sum(tuple(core[j].shape) == tuple(core[k].shape) for j in chosen) for k in chosen}
    rest = 2 * sum(v.numel() for k, v in core.items() if k not in chosen) / 1e9  # bf16, as exported
    face_gb = 2 * sum(v.numel() for v in face.values()) / 1e9
    rows = [f"| weights | transformer file GB | while sampling GB (+ face layers {face_gb:.2f}, VAE and activations) |",
            "|---|---:|---:|"]
    for name in ["bf16", *formats]:
        stored = 0
        for shape, count in shapes.items():
            w = torch.randn(shape)
            layer = {"w": w.bfloat16()} if name == "bf16" else quant._QUANTIZERS[name](w)[0]
            stored += count * sum(t.numel() * t.element_size() for t in layer.values()) / 1e9
        rows.append(f"| {name} | {stored + rest:.2f} | {stored + rest + face_gb + SAMPLING_REST_GB:.1f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.splitlines()[1])
    parser.add_argument("--size", choices=(*QUANT_SIZES, "real"), default="tiny",
                        help="real: estimate the GPU memory at ConsisID-preview's size (no ComfyUI, no run)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the size's)")
    parser.add_argument("--formats", default=",".join(quant.FORMATS), help="comma-separated core formats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="a Markdown file to write the table into (its quant-SIZE section)")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    for name in formats:
        quant.check_format(name)
    if args.size == "real":
        text = (f"### quant-real-estimate: GPU memory in core's quantized formats at ConsisID-preview's size "
                f"(49 frames at 720×480, bf16 compute), estimated (GB, 10⁹ bytes)\n\n`python -m bench.quant --size real` "
                f"on {date.today().isoformat()}: the exported transformer's bytes (each distinct layer shape "
                f"quantized once), the face layers in bf16, and the VAE and a guided forward's activations from "
                f"real-gpu-memory-estimate; not measured on a GPU\n\n" + real_estimate(formats))
        sys.stdout.write(text)
        if args.out:
            write_section(args.out, "quant-real-estimate", text)
        return 0
    if not os.environ.get("COMFYUI_DIR"):
        parser.error("set COMFYUI_DIR to a ComfyUI source folder with native CogVideoX (v0.33.0)")
    size = replace(QUANT_SIZES[args.size], steps=args.steps or QUANT_SIZES[args.size].steps)
    with tempfile.TemporaryDirectory(prefix="consisid-quant-") as tmp:
        results = measure(size, size.steps, args.threads, formats, Path(tmp))
    text = table(size, size.steps, args.threads, results)
    sys.stdout.write(text)
    if args.out:
        write_section(args.out, f"quant-{size.name}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
