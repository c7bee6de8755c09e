"""GPU memory (and compute) of a run at a bench size, estimated on the CPU with no GPU and no weights.

    python -m bench.gpu_memory --size real [--dtype bf16] [--out bench/RESULTS.md]

Each phase runs on PyTorch's meta device while the bytes of the live tensors are counted
(bench/README.md, "GPU memory, estimated on the CPU", says what is counted and what is left out).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from consisid_core.checkpoint import DTYPES
from consisid_core.decoder import speed_up_decoder
from consisid_core.text import MAX_SEQUENCE_LENGTH
from consisid_core.tiling import Tiling, vae_options

from .report import write_section
from .sizes import SIZES, Size, t5_config

logger = logging.getLogger("bench")

H100_BF16_FLOPS = 989e12
"""NVIDIA H100 SXM's dense bf16 tensor-core peak (its datasheet: 1,979 TFLOPS with sparsity)."""

T5_VOCABULARY = 32128
"""T5-XXL's vocabulary (the released checkpoint's text encoder)."""


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that operations create and that are still alive,
    and their peak. Storages that existed before (weights, inputs) are left out."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.holders: dict[int, int] = {}  # storage -> live tensors viewing it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _released(self, key: int) -> None:
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.existing:
                continue
            if key not in self.holders:
                self.holders[key], self.sizes[key] = 0, storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.holders[key] += 1
            weakref.finalize(tensor, self._released, key)
        return out


class FusedAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` as a fused GPU kernel allocates: its output and a float32
    log-sum-exp per query, never the [queries × keys] scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query, _, value = args[:3]
            out_and_log_sum_exp = (  # both alive while the kernel runs; the log-sum-exp dies on return
                torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device),
                torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device),
            )
            return out_and_log_sum_exp[0]
        return func(*args, **(kwargs or {}))


def peak_bytes(run, existing: list[torch.Tensor]) -> int:
    """The most bytes `run()` holds in tensors at once, beyond `existing` ones."""
    with torch.no_grad(), FusedAttention(), LiveBytes(existing) as counter:
        run()
    return counter.peak


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class Models:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    """As our loaders return it: its decoder rebuilt by `consisid_core.decoder.speed_up_decoder`."""
    t5: torch.nn.Module
    diffusers_vae: torch.nn.Module


def meta_models(size: Size, dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKLCogVideoX, ConsisIDTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    t5 = t5_config(size, "t5", T5_VOCABULARY)
    with torch.device("meta"):
        return Models(
            ConsisIDTransformer3DModel(**size.transformer).to(dtype).eval(),
            speed_up_decoder(AutoencoderKLCogVideoX(**size.vae).to(dtype).eval()),
            T5EncoderModel(
                T5Config(vocab_size=T5_VOCABULARY, d_model=size.transformer["text_embed_dim"], **t5)
            ).to(dtype).eval(),
            AutoencoderKLCogVideoX(**size.vae).to(dtype).eval(),
        )


FORWARD = "transformer forward (guided batch of 2)"
DIFFUSERS_DECODE = "decode, whole frames, diffusers' decoder"


def phase_peaks(size: Size, models: Models, dtype: torch.dtype) -> dict[str, int]:
    """Peak activation bytes of each phase at this size (see the module doc)."""
    phases, inputs = _phases(size, models, dtype)
    return {name: peak_bytes(run, inputs) for name, run in phases.items()}


def forward_flops(size: Size, models: Models, dtype: torch.dtype) -> int:
    """Floating-point operations of one transformer forward of the guided batch (matmuls and
    attention, as `torch.utils.flop_counter` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    phases, _ = _phases(size, models, dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        phases[FORWARD]()
    return counter.get_total_flops()


def _phases(size: Size, models: Models, dtype: torch.dtype):
    """Each phase as a callable over meta inputs, and those inputs."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    config, vae = models.transformer.config, models.vae
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    temporal = vae.config.temporal_compression_ratio
    frames = (size.frames - 1) // temporal + 1
    h, w = size.height // spatial, size.width // spatial
    meta = {"device": "meta", "dtype": dtype}

    tokens = torch.zeros(1, MAX_SEQUENCE_LENGTH, dtype=torch.long, device="meta")
    image = torch.empty(1, 3, 1, size.height, size.width, **meta)
    latents = torch.empty(2, frames, config.in_channels, h, w, **meta)  # noise and image latents
    text = torch.empty(2, MAX_SEQUENCE_LENGTH, config.text_embed_dim, **meta)
    timestep = torch.zeros(2, dtype=torch.long, device="meta")
    patch = config.patch_size
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=((0, 0), (h // patch, w // patch)),
        grid_size=(h // patch, w // patch),
        temporal_size=frames,
        device="cpu",
    )
    rotary = (cos.to(**meta), sin.to(**meta))
    id_cond = torch.empty(1, config.LFE_id_dim, **meta)
    id_vit = [torch.empty(1, 577, config.LFE_vit_dim, **meta) for _ in range(config.LFE_num_scale)]
    decode_input = torch.empty(1, vae.config.latent_channels, frames, h, w, **meta)
    inputs = [tokens, image, latents, text, timestep, *rotary, id_cond, *id_vit, decode_input]

    def forward():
        models.transformer(
            hidden_states=latents, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary,
            id_cond=id_cond, id_vit_hidden=id_vit, return_dict=False,
        )

    def tiled_decode():
        with vae_options(vae, Tiling.halves(size.height, size.width, spatial), slicing=False):
            vae.decode(decode_input)

    def text_encode():  # the prompt, then the negative prompt, as encode_prompt does
        models.t5(tokens)[0]
        models.t5(tokens)[0]

    phases = {
        "text": text_encode,
        "first frame encode": lambda: vae.encode(image),
        FORWARD: forward,
        "decode, whole frames": lambda: vae.decode(decode_input),
        "decode, half-frame tiles": tiled_decode,
        DIFFUSERS_DECODE: lambda: models.diffusers_vae.decode(decode_input),
    }
    return phases, inputs


def report(size: Size, dtype: torch.dtype) -> str:
    models = meta_models(size, dtype)
    weights = {name: weight_bytes(getattr(models, name)) for name in ("t5", "transformer", "vae")}
    peaks = phase_peaks(size, models, dtype)
    flops = forward_flops(size, models, dtype)
    sampling = max(peaks["first frame encode"], peaks[FORWARD])

    def gb(n: int) -> str:
        return f"{n / 1e9:,.2f}"

    ours_text = weights["t5"] + peaks["text"]
    ours_sampling = weights["transformer"] + weights["vae"] + sampling
    ours_decode = {
        mode: weights["vae"] + peaks[f"decode, {mode}"] for mode in ("whole frames", "half-frame tiles")
    }
    resident = sum(weights.values())
    diffusers = resident + max(peaks["text"], sampling, peaks[DIFFUSERS_DECODE])
    ours_tiled = max(ours_text, ours_sampling, ours_decode["half-frame tiles"])
    ours_whole = max(ours_text, ours_sampling, ours_decode["whole frames"])
    parameters = {name: sum(p.numel() for p in getattr(models, name).parameters()) / 1e9 for name in weights}
    rows = [
        f"- parameters: transformer {parameters['transformer']:.2f} B, VAE {parameters['vae']:.2f} B, T5 "
        f"{parameters['t5']:.2f} B ({'T5-XXL' if size.name == 'real' else 'the released share of T5-XXL'})",
        "",
        "| phase | weights on the GPU | activations peak | ours: peak |",
        "|---|---:|---:|---:|",
        f"| text (T5) | {gb(weights['t5'])} | {gb(peaks['text'])} | {gb(ours_text)} |",
        f"| sampling (transformer + VAE) | {gb(weights['transformer'] + weights['vae'])} | {gb(sampling)} "
        f"| {gb(ours_sampling)} |",
        f"| decode, whole frames (VAE) | {gb(weights['vae'])} | {gb(peaks['decode, whole frames'])} "
        f"| {gb(ours_decode['whole frames'])} |",
        f"| decode, half-frame tiles (VAE) | {gb(weights['vae'])} | {gb(peaks['decode, half-frame tiles'])} "
        f"| {gb(ours_decode['half-frame tiles'])} |",
    ]
    summary = [
        f"- ours, whole run, VAE tiling on: **{gb(ours_tiled)} GB** (the largest phase)",
        f"- ours, whole run, VAE tiling off: {gb(ours_whole)} GB",
        f"- diffusers at its defaults (`pipe.to('cuda')`, no tiling: all {gb(resident)} GB of weights "
        f"resident, plus its largest phase): {gb(diffusers)} GB; ours/diffusers "
        f"{ours_tiled / diffusers:.2f} (tiling on), {ours_whole / diffusers:.2f} (tiling off)",
        "- activations of each phase: " + ", ".join(f"{name} {gb(n)}" for name, n in peaks.items()),
        f"- compute: one transformer forward of the guided batch is {flops / 1e12:,.1f} TFLOP, so 50 steps are "
        f"{50 * flops / 1e15:,.1f} PFLOP: {50 * flops / H100_BF16_FLOPS:,.0f} s at an H100 SXM's dense bf16 peak "
        f"({H100_BF16_FLOPS / 1e12:,.0f} TFLOPS), {50 * flops / (0.6 * H100_BF16_FLOPS):,.0f} s at 60 % of it",
    ]
    return "\n".join(rows + [""] + summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, help="also write the table into this markdown file (its own section)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    size = SIZES[args.size]
    section = f"{size.name}-gpu-memory-estimate"
    text = "\n".join(
        [
            f"### {section}: {size.frames} frames at {size.width}×{size.height}, {args.dtype}, estimated (GB, 10⁹ bytes)",
            "",
            f"`python -m bench.gpu_memory --size {size.name} --dtype {args.dtype}` on "
            f"{datetime.date.today().isoformat()}: live tensor bytes on the meta device (no GPU, no weights); "
            "leaves out the CUDA context, allocator fragmentation and cuDNN workspaces",
            f"- checkpoint: {size.describe()}",
            "",
            report(size, DTYPES[args.dtype]),
        ]
    )
    sys.stdout.write(text + "\n")
    if args.out:
        write_section(args.out, section, text)
        logger.info("wrote the %s section of %s", section, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
