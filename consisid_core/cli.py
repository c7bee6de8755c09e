"""`python -m consisid_core`: make-tiny, embed, generate.

Bad arguments exit with status 2 and one line on stderr, before any work and with nothing written.
Ctrl-C (SIGINT) and SIGTERM stop a run with one line and exit 130 / 143, leaving no temporary
file or folder behind and nothing at `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .checks import check_number, check_prompt, check_seed, check_steps
from .errors import ConsisIDError, first_line
from .performance import ATTENTION_BACKENDS, OFFLOAD_MODES

logger = logging.getLogger("consisid_core")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not the usage block) like every other refusal."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m consisid_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight ConsisID checkpoint (real formats)")
    tiny.add_argument("dir", type=Path, help="a new or empty folder")
    tiny.add_argument("--seed", type=int, default=0, help="weights are deterministic from this seed (0 to 2^32 - 1)")
    tiny.add_argument("--kps", action="store_true", help="a checkpoint with is_kps on (keypoint conditioning)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="checkpoint folder, or 'tiny' for a tiny one made on the fly")
        p.add_argument("--provider", default="cpu", help="ONNX Runtime provider for the face models: cpu, cuda, …")
        p.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cpu, cuda, cuda:1, …")
        p.add_argument("--face-index", type=int, default=None, help="which face, left to right (default: largest)")

    embed = sub.add_parser("embed", help="photo -> identity .safetensors")
    common(embed)
    embed.add_argument("--face", type=Path, required=True, help="a photo of one person's face")
    embed.add_argument("--out", type=Path, required=True, help="identity file to write (.safetensors)")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")

    gen = sub.add_parser("generate", help="identity + prompt -> video")
    common(gen)
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--face", type=Path, help="a photo of the person")
    who.add_argument("--identity", type=Path, help="an identity file from `embed`")
    gen.add_argument("--prompt", required=True, help="what happens in the video")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from")
    gen.add_argument("--image", type=Path, help="first frame (default: the aligned face, as the reference)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    gen.add_argument("--dynamic-cfg", action="store_true", help="the reference's cosine guidance schedule")
    gen.add_argument("--frames", type=int, help="frame count, 4k+1 (default: the checkpoint's, 49)")
    gen.add_argument("--height", type=int, help="multiple of 16 (default: the checkpoint's, 480)")
    gen.add_argument("--width", type=int, help="multiple of 16 (default: the checkpoint's, 720)")
    gen.add_argument("--fps", type=int, default=8, help="frames per second of an .mp4")
    gen.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--fp8", action="store_true", help="store the transformer's linear weights in fp8 (less memory)")
    gen.add_argument("--offload", choices=OFFLOAD_MODES, default="model",
                     help="model: whole models on the GPU for the run; sequential: stream the transformer's layers")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    gen.add_argument("--step-cache", type=float, default=0.0,
                     help="TeaCache threshold: 0 off; 0.1 / 0.15 / 0.2 trade quality for speed")
    gen.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                     help="sdpa: PyTorch's, as diffusers; sage: SageAttention (pip install sageattention; CUDA, bf16/fp16)")
    gen.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    gen.add_argument("--allow-oversize", action="store_true",
                     help="allow more than 8x the checkpoint's frames or 4x its pixels per frame in one pass")
    gen.add_argument("--out", type=Path, required=True, help="a path ending in .mp4, or a folder for PNG frames")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an existing .mp4 at --out, or a folder of frames written by an earlier run")
    return parser


MAX_FPS = 240
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConsisIDError(f"device '{name}' is not one to run on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConsisIDError(f"device '{name}' asked for, but torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConsisIDError(
                f"device '{name}' asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s): "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConsisIDError(f"device '{name}' asked for, but this torch has no MPS device; use --device cpu")
    return device


@contextlib.contextmanager
def _checkpoint_folder(model: str) -> Iterator[Path]:
    """The checkpoint folder; for 'tiny', one made for this run and removed after."""
    if model != "tiny":
        yield Path(model)
        return
    from .tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="consisid-tiny-") as tmp:
        yield make_tiny(Path(tmp) / "checkpoint")


def _embed_photo(checkpoint, photo: Path, args, device: torch.device):
    from .face import extract_identity, load_face_models
    from .media import read_image

    image = read_image(photo)
    faces = load_face_models(checkpoint.face_encoder_dir, provider=args.provider, device=device)
    return extract_identity(faces, image, face_index=args.face_index, source_name=photo.name).identity


def _make_tiny(args) -> None:
    from .tiny import make_tiny

    check_number("--seed", args.seed, 0, 2**32 - 1, integer=True)
    make_tiny(args.dir, seed=args.seed, kps=args.kps)


def _embed(args) -> None:
    from .checkpoint import Checkpoint
    from .identity import save_identity
    from .media import check_output, read_image

    device = _device(args.device)
    read_image(args.face)
    check_output(args.out, args.overwrite, suffixes=(".safetensors",))
    with _checkpoint_folder(args.model) as folder:
        identity = _embed_photo(Checkpoint.open(folder), args.face, args, device)
    save_identity(identity, args.out, overwrite=args.overwrite)
    logger.info("wrote %s", args.out)


def _generate(args) -> None:
    from .checkpoint import Checkpoint, dtype_from_name
    from .identity import load_identity
    from .media import check_output, read_image, write_frames
    from .performance import Performance, sage_kernel
    from .sampling import MAX_GUIDANCE, Tiling, check_run_fits, decode, resolve_size, sample
    from .text import encode_with_checkpoint

    device = _device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    check_output(args.out, args.overwrite)
    check_prompt(args.prompt)
    check_prompt(args.negative_prompt, "negative prompt")
    check_seed(args.seed, "--seed")
    check_number("--fps", args.fps, 1, MAX_FPS, integer=True)
    check_number("--guidance", args.guidance, 0, MAX_GUIDANCE, "the reference uses 6")
    identity = load_identity(args.identity) if args.identity else None
    if args.face:
        read_image(args.face)
    image = read_image(args.image).convert("RGB") if args.image else None
    performance = Performance(
        compile=args.compile, offload=args.offload, step_cache=args.step_cache, attention=args.attention
    )
    with _checkpoint_folder(args.model) as folder:
        checkpoint = Checkpoint.open(folder)
        check_steps(args.steps, checkpoint.scheduler_config.get("num_train_timesteps", 1000), "--steps")
        size = resolve_size(
            checkpoint.transformer_config, checkpoint.vae_config, args.frames, args.height, args.width,
            args.allow_oversize,
        )
        check_run_fits(checkpoint, dtype_from_name(dtype), *size, device, args.offload == "sequential", args.fp8)
        if performance.attention == "sage":  # refused before any work, not at the first step
            sage_kernel(device, dtype_from_name(dtype), checkpoint.transformer_config["attention_head_dim"])
        if identity is None and args.face is None:
            if args.model != "tiny":
                raise ConsisIDError("give the person as --face PHOTO or --identity FILE")
            from .tiny import random_identity

            logger.info("no --face or --identity: the tiny demo uses a random identity")
            identity = random_identity(checkpoint.transformer_config)
        if identity is not None:
            identity.check_compatible(checkpoint.transformer_config, f"'{args.identity or 'the identity'}'")
        if identity is None:
            identity = _embed_photo(checkpoint, args.face, args, device)
        text = encode_with_checkpoint(checkpoint, dtype_from_name(dtype), args.prompt, args.negative_prompt, device)
        model = checkpoint.load_model(dtype, fp8=args.fp8)
        frames, height, width = size
        latents = sample(
            model, identity, text, image,
            seed=args.seed, steps=args.steps, guidance_scale=args.guidance, dynamic_cfg=args.dynamic_cfg,
            frames=frames, height=height, width=width, device=device, progress_bar=True, performance=performance,
            allow_oversize=args.allow_oversize,
        )
        vae, model = model.vae, None  # the transformer is done: release it before the decode's peak
        gc.collect()  # diffusers' hook registries hold reference cycles to their modules
        video = decode(vae, latents, device, tiling=Tiling() if args.vae_tiling else None)
    write_frames(video, args.out, args.fps, overwrite=args.overwrite)
    logger.info("wrote %d frames to %s", video.shape[0], args.out)


_COMMANDS = {"make-tiny": _make_tiny, "embed": _embed, "generate": _generate}


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every `finally` cleans up as for Ctrl-C."""


@contextlib.contextmanager
def _terminating_cleanly() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` (only the main thread gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with _terminating_cleanly():
            _COMMANDS[args.command](args)
    except ConsisIDError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except ImportError as e:  # an optional dependency (ONNX Runtime, SageAttention): its message says what to install
        sys.stderr.write(f"error: {first_line(e, 10_000)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("cancelled: nothing was written\n")
        return 130
    except Terminated:
        sys.stderr.write("terminated: nothing was written\n")
        return 143
    except OSError as e:  # the disk filled up, a folder vanished mid-run: written files are cleaned up
        sys.stderr.write(f"error: {e.strerror or e} ({e.filename or 'while writing'}); nothing was written\n")
        return 1
    finally:
        logger.removeHandler(handler)
    return 0
