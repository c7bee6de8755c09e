"""`python -m consisid_core`: make-tiny, embed, generate, score, export.

A command's result goes to stdout, to be piped: the path written (embed, generate), the score
(score; `--json -`: its JSON). Logs and progress go to stderr.

Bad arguments exit with status 2 and one line on stderr, before any work and with nothing written.
Under torchrun (`generate --parallel`), a refusal that every rank makes is said once, by rank 0.
Ctrl-C (SIGINT) and SIGTERM stop a run with one line and exit 130 / 143, leaving no temporary
file or folder behind and nothing at `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checks import check_number, check_prompt, decoded_frames
from .errors import ConsisIDError, RankError, first_line
from .lora import lora_argument, read_loras, with_loras
from .native import EXPORT_DTYPES, export
from .performance import ATTENTION_BACKENDS, OFFLOAD_MODES
from .quant import FORMATS

if TYPE_CHECKING:
    from PIL import Image

    from .checkpoint import Checkpoint
    from .identity import Identity
    from .lora import Stack
    from .parallel import Parallel
    from .performance import Performance
    from .sampling import Run
    from .score import SampledFrames
    from .text import TextEmbeddings

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
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument("--kps", action="store_true", help="a checkpoint with is_kps on (keypoint conditioning)")
    kind.add_argument("--native", action="store_true",
                      help="one that core ComfyUI's loaders also take, for the native workflows (a released-size VAE, "
                           "about 430 MB, random)")

    embed = sub.add_parser("embed", help="photo -> identity .safetensors")
    _common(embed)
    embed.add_argument("--face", type=Path, required=True, help="a photo of one person's face")
    embed.add_argument("--out", type=Path, required=True, help="identity file to write (.safetensors)")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")

    _add_generate(sub.add_parser("generate", help="identity + prompt -> video"))

    score = sub.add_parser("score", help="video + identity -> FaceSim-Arc, how well the video keeps the face")
    score.add_argument("--model", required=True, help="checkpoint folder (its face_encoder/ models are used)")
    score.add_argument("--provider", default="cpu", help="ONNX Runtime provider for the face models: cpu, cuda, …")
    ref = score.add_mutually_exclusive_group(required=True)
    ref.add_argument("--identity", type=Path, help="an identity file from `embed` (it holds the face embedding)")
    ref.add_argument("--face", type=Path, help="a photo of the person (its largest face)")
    score.add_argument("--video", type=Path, required=True, help="an .mp4 file, or a folder of PNG frames")
    score.add_argument("--frames-sampled", type=int, default=16, help="evenly spaced frames scored (the protocol's 16)")
    score.add_argument("--json", type=Path,
                       help="also write the scores to this .json file; '-' writes them to stdout instead of the score")
    score.add_argument("--overwrite", action="store_true", help="replace an existing file at --json")
    _add_export(sub)
    return parser


def _add_export(sub) -> None:
    """The `export` subcommand's arguments."""
    export_parser = sub.add_parser(
        "export", help="a ConsisID transformer -> ComfyUI's CogVideoX layout (core UNETLoader) + its face modules")
    export_parser.add_argument("--model", type=Path,
                               help="a ConsisID checkpoint folder, or one transformer .safetensors with diffusers key names")
    export_parser.add_argument("--lora", type=Path, action="append", default=[],
                               help="also a ConsisID LoRA (diffusers layout) -> <its name>_comfy.safetensors in --out, "
                                    "for core's LoRA loaders (repeat for several)")
    export_parser.add_argument("--out", required=True, type=Path,
                               help="folder for <name>_transformer.safetensors and <name>_face.safetensors "
                                    "(e.g. ComfyUI/models/diffusion_models)")
    export_parser.add_argument("--name", default="consisid",
                               help="the files' name prefix, a plain file name without a path (default: consisid)")
    export_parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="keep",
                               help="weights' precision (keep: as most of them are stored)")
    export_parser.add_argument("--quant", metavar="FORMAT",
                               help="store the transformer's block linear layers in a ComfyUI core quantized format "
                                    f"(ComfyUI v0.33 or later): {', '.join(FORMATS)}; the face modules stay as they are")
    export_parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def _export(args) -> None:
    """The files written, one path a line on stdout: all of them, or none."""
    if args.model is None and not args.lora:
        raise ConsisIDError("export needs --model, --lora or both")
    if args.quant is not None and args.model is None:
        raise ConsisIDError(f"--quant {args.quant} stores a transformer in that format: give --model too")
    for path in export(args.model, args.out, args.name, args.overwrite, EXPORT_DTYPES[args.dtype], args.lora,
                       args.quant):
        print(path)


def _common(p: argparse.ArgumentParser) -> None:
    """The options of embed and generate: the checkpoint, the face models' and torch's devices."""
    p.add_argument("--model", required=True, help="checkpoint folder, or 'tiny' for a tiny one made on the fly")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime provider for the face models: cpu, cuda, …")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cpu, cuda, cuda:1, …")
    p.add_argument("--face-index", type=int, default=None, help="which face, left to right (default: largest)")


def _add_generate(gen: argparse.ArgumentParser) -> None:
    from .sampling import MAX_IDENTITY_STRENGTH, SCHEDULERS

    _common(gen)
    who = gen.add_mutually_exclusive_group()
    who.add_argument("--face", type=Path, help="a photo of the person")
    who.add_argument("--identity", type=Path, help="an identity file from `embed`")
    gen.add_argument("--prompt", required=True, action="append",
                     help="what happens in the video; give it once per segment for a prompt of each segment's own")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from")
    gen.add_argument("--image", type=Path, help="first frame (default: the aligned face, as the reference)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    gen.add_argument("--dynamic-cfg", action="store_true", help="the reference's cosine guidance schedule")
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="dpm",
                     help="dpm: CogVideoX DPM, as the reference; ddim: CogVideoX DDIM")
    gen.add_argument("--identity-strength", type=float,
                     help=f"scale of the face features, 0 to {MAX_IDENTITY_STRENGTH:g} (default: the checkpoint's "
                          "local_face_scale, 1 as trained)")
    gen.add_argument("--frames", type=int, help="frame count, 4k+1; 8k+1 decode to exactly as many (default: the checkpoint's, 49)")
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
    gen.add_argument("--lora", action="append", type=lora_argument, default=[], metavar="FILE[:STRENGTH]",
                     help="a LoRA .safetensors (diffusers layout) at a strength (default 1, as fuse_lora's lora_scale); "
                          "repeat to stack LoRAs")
    gen.add_argument("--allow-oversize", action="store_true",
                     help="allow more than 8x the checkpoint's frames or 4x its pixels per frame in one pass")
    gen.add_argument("--parallel", metavar="SPLIT",
                     help="under torchrun, one video over its processes: ulysses=N, ring=N, cfg=2, joined by commas "
                          "(e.g. ulysses=2,cfg=2; the product is the process count); rank 0 writes --out")
    gen.add_argument("--segments", type=int, default=1,
                     help="a long video: this many segments of --frames each, each starting from the last frame of "
                          "the one before; segment k uses seed + k - 1 (at most 32)")
    gen.add_argument("--colour-match", action="store_true",
                     help="give every later segment the colour (CIELAB mean and spread) of the first")
    gen.add_argument("--out", type=Path, required=True, help="a path ending in .mp4, or a folder for PNG frames")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an existing .mp4 at --out, or a folder of frames written by an earlier run")
    gen.add_argument("--score", action="store_true",
                     help="also log how well the video keeps the face (FaceSim-Arc, as `score`), per segment")


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
    from .face import onnxruntime_offline
    from .tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="consisid-tiny-") as tmp:
        with onnxruntime_offline():  # diffusers imports ONNX Runtime to save the pipeline
            folder = make_tiny(Path(tmp) / "checkpoint")
        yield folder


def _embed_photo(checkpoint, photo: Path, args, device: torch.device):
    from .face import extract_identity, load_face_models
    from .media import read_image

    image = read_image(photo)
    faces = load_face_models(checkpoint.face_encoder_dir, provider=args.provider, device=device)
    return extract_identity(faces, image, face_index=args.face_index, source_name=photo.name).identity


def _make_tiny(args) -> None:
    from .face import onnxruntime_offline
    from .tiny import make_tiny

    check_number("--seed", args.seed, 0, 2**32 - 1, integer=True)
    with onnxruntime_offline():  # diffusers imports ONNX Runtime to save the pipeline
        make_tiny(args.dir, seed=args.seed, kps=args.kps, native=args.native)


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
    print(args.out)


@dataclass(frozen=True)
class _Request:
    """What `generate`'s arguments ask for, each checked before the checkpoint is opened."""

    device: torch.device
    spec: Parallel | None
    dtype: torch.dtype
    prompts: list[str]
    identity: Identity | None
    image: Image.Image | None
    performance: Performance


@dataclass(frozen=True)
class _Plan:
    """The run sized against the checkpoint's configs, every refusal they decide made: no weights
    loaded yet, and under --parallel the same on every rank, before the ranks meet."""

    checkpoint: Checkpoint
    run: Run
    loras: Stack
    scored: SampledFrames | None


def _generate(args) -> None:
    """The arguments checked, the run sized against the checkpoint's configs (every refusal made
    before any weights load and, under --parallel, before the ranks meet), then the identity, the
    text and the video, written; the path written on stdout."""
    from .checkpoint import Checkpoint
    from .parallel import session

    request = _checked_request(args)
    with _checkpoint_folder(args.model) as folder:
        plan = _preflight(args, request, Checkpoint.open(folder))
        with session(request.spec, request.device):
            run = _identity(args, request, plan)
            written = _write(args, request, plan, run, _texts(args, request, plan))
    if written:
        logger.info("wrote %d frames to %s", written, args.out)
        print(args.out)


def _checked_request(args) -> _Request:
    from .checkpoint import dtype_from_name
    from .identity import load_identity
    from .media import check_output, read_image
    from .parallel import Parallel, rank_device
    from .performance import Performance
    from .segments import segment_prompts

    device = _device(args.device)
    spec = Parallel.parse(args.parallel) if args.parallel is not None else None
    if spec is not None:  # refused outside torchrun, or with another process count, before anything else
        device = rank_device(spec, device, ":" in args.device)
    check_output(args.out, args.overwrite)
    for prompt in args.prompt:
        check_prompt(prompt)
    prompts = segment_prompts(args.prompt, args.segments)
    check_prompt(args.negative_prompt, "negative prompt")
    check_number("--fps", args.fps, 1, MAX_FPS, integer=True)
    identity = load_identity(args.identity) if args.identity else None
    if args.face:
        read_image(args.face)
    image = read_image(args.image).convert("RGB") if args.image else None
    performance = Performance(
        compile=args.compile, offload=args.offload, step_cache=args.step_cache, attention=args.attention
    )
    dtype = dtype_from_name(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    return _Request(device, spec, dtype, prompts, identity, image, performance)


def _preflight(args, request: _Request, checkpoint: Checkpoint) -> _Plan:
    from .performance import sage_kernel
    from .sampling import Run, RunOptions
    from .segments import check_segments
    from .tiling import Tiling

    options = RunOptions(
        seed=args.seed, steps=args.steps, guidance_scale=args.guidance, dynamic_cfg=args.dynamic_cfg,
        frames=args.frames, height=args.height, width=args.width, scheduler=args.scheduler,
        identity_strength=args.identity_strength, device=request.device, performance=request.performance,
        allow_oversize=args.allow_oversize, parallel=request.spec, tiling=Tiling() if args.vae_tiling else None,
    )
    labels = {
        "seed": "--seed", "steps": "--steps", "guidance": "--guidance", "identity strength": "--identity-strength"
    }
    if args.identity is not None:
        labels["identity"] = f"'{args.identity}'"
    run = Run.prepare(checkpoint.transformer_config, checkpoint.vae_config, checkpoint.scheduler_config,
                      request.dtype, options, labels=labels)
    check_segments(args.segments, run.options.frames)
    # an even latent frame count decodes to more frames than asked: the frames the score will see
    decoded = decoded_frames(run.options.frames, checkpoint.vae_config["temporal_compression_ratio"])
    scored = _score_keeper(args, checkpoint, decoded)
    loras = read_loras(args.lora, checkpoint.transformer_config)
    run = run.check_room(checkpoint, args.fp8)
    if request.performance.attention == "sage":  # refused before any work, not at the first step
        sage_kernel(request.device, request.dtype, checkpoint.transformer_config["attention_head_dim"])
    if request.identity is not None:
        run = run.with_identity(request.identity, request.image)
    elif args.face is None and args.model != "tiny":
        raise ConsisIDError("give the person as --face PHOTO or --identity FILE")
    return _Plan(checkpoint, run, loras, scored)


def _identity(args, request: _Request, plan: _Plan) -> Run:
    """The run with its person: from the identity file, from the face photo (under --parallel,
    rank 0 alone loads the face models and sends the identity to the others), or random for the
    tiny demo."""
    from .identity import Identity
    from .parallel import from_rank0

    if plan.run.identity is not None:
        return plan.run
    if args.face is None:
        from .tiny import random_identity

        logger.info("no --face or --identity: the tiny demo uses a random identity")
        return plan.run.with_identity(random_identity(plan.checkpoint.transformer_config), request.image)

    def embed() -> list[torch.Tensor]:
        return _embed_photo(plan.checkpoint, args.face, args, request.device).tensors()

    return plan.run.with_identity(Identity.from_tensors(from_rank0(request.spec, embed)), request.image)


def _texts(args, request: _Request, plan: _Plan) -> list[TextEmbeddings]:
    """Each segment's prompt encoded by the checkpoint's T5 (under --parallel, on rank 0 alone)."""
    from .parallel import from_rank0
    from .text import TextEmbeddings, encode_all_with_checkpoint

    def encode() -> list[torch.Tensor]:
        texts = encode_all_with_checkpoint(
            plan.checkpoint, request.dtype, request.prompts, args.negative_prompt, request.device
        )
        return [t for text in texts for t in (text.positive, text.negative)]

    values = from_rank0(request.spec, encode)
    return [TextEmbeddings(positive, negative) for positive, negative in zip(values[::2], values[1::2])]


def _write(args, request: _Request, plan: _Plan, run: Run, texts: list[TextEmbeddings]) -> int:
    """Sample, decode and write the video, segment after segment; the frames written (0 on the
    ranks of --parallel that write nothing: all but rank 0)."""
    from .media import FrameWriter
    from .parallel import is_writer
    from .segments import run_segments

    writes = is_writer()
    progress = _segment_progress(args.segments, args.steps) if writes else contextlib.nullcontext()
    writer = FrameWriter(args.out, args.fps, args.overwrite) if writes else _Discarded()
    with writer, progress as bar:
        # the generator holds the only reference to the model: the transformer is released before the
        # last segment's decode (diffusers' hook registries hold reference cycles: it collects them)
        segments = run_segments(
            run.with_model(with_loras(plan.checkpoint.load_model(request.dtype, fp8=args.fp8), plan.loras)), texts,
            colour_match=args.colour_match, callback=bar,
        )
        for video in segments:  # each segment's new frames, as soon as decoded
            writer.write(video)
            if plan.scored is not None:
                plan.scored.add(video)  # keeps only the frames the score samples
        if plan.scored is not None and writes:  # before the video is published: a failure leaves nothing
            _log_scores(plan.scored, plan.checkpoint, run.identity, args.provider)
    return writer.count if writes else 0


class _Discarded:
    """The frame writer of a rank that writes nothing (every rank but 0 under --parallel)."""

    count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, video: torch.Tensor) -> None:
        self.count += video.shape[0]


@contextlib.contextmanager
def _segment_progress(segments: int, steps: int) -> Iterator:
    """A progress bar over all steps of all segments, naming the segment (a `SegmentCallback`)."""
    from tqdm import tqdm

    with tqdm(total=segments * steps, unit="step", dynamic_ncols=True) as bar:

        def update(segment: int, done: int, total: int, latents) -> None:
            if done == 0:
                bar.set_description(f"segment {segment}/{segments}")
            bar.update((segment - 1) * steps + done - bar.n)

        yield update


def _score_keeper(args, checkpoint, frames: int):
    """For `generate --score` of segments that decode to `frames` frames each: what keeps the
    sampled frames, once the face models' folder and ONNX Runtime are known to be there (before any
    work); None without --score."""
    if not args.score:
        return None
    from .face import resolve_providers
    from .score import SampledFrames

    if not checkpoint.face_encoder_dir.is_dir():
        raise ConsisIDError(
            f"--score needs the checkpoint's face models, and '{checkpoint.face_encoder_dir}' does not exist; "
            "add the face_encoder folder of the ConsisID checkpoint, or leave out --score"
        )
    resolve_providers(args.provider)
    return SampledFrames.of_segments(args.segments, frames)


def _log_scores(scored, checkpoint, identity, provider: str) -> None:
    """FaceSim-Arc of what `generate` made: each segment's (a long video), then the whole video's."""
    from .face import load_face_models
    from .score import identity_embedding

    faces = load_face_models(checkpoint.face_encoder_dir, provider=provider)
    parts, whole = scored.scores(faces, identity_embedding(identity, faces))
    if len(parts) > 1:
        for k, part in enumerate(parts, 1):
            logger.info("segment %d: %s", k, part.summary())
    logger.info("video: %s", whole.summary())


def _score(args) -> None:
    from .checkpoint import Checkpoint
    from .face import load_face_models, to_rgb_uint8
    from .identity import load_identity
    from .media import check_output, read_image, read_video
    from .score import check_frames_sampled, identity_embedding, photo_embedding, sample_indices, score_frames

    frames_sampled = check_frames_sampled(args.frames_sampled, "--frames-sampled")
    to_stdout = args.json is not None and str(args.json) == "-"
    if args.json is not None and not to_stdout:
        check_output(args.json, args.overwrite, suffixes=(".json",))
    identity = load_identity(args.identity) if args.identity else None
    photo = to_rgb_uint8(read_image(args.face), args.face.name) if args.face else None
    checkpoint = Checkpoint.open(args.model)
    if identity is not None:
        identity.check_compatible(checkpoint.transformer_config, f"'{args.identity}'")
    video = read_video(args.video, lambda count: sample_indices(count, frames_sampled))
    faces = load_face_models(checkpoint.face_encoder_dir, provider=args.provider)
    if identity is not None:
        reference = identity_embedding(identity, faces, f"'{args.identity}'")
    else:
        reference = photo_embedding(faces, photo, str(args.face))
    result = score_frames(faces, reference, video.frames, video.indices, video.count)
    logger.info("%s: %s", args.video, result.summary())
    for line in result.per_frame().splitlines():
        logger.info("  %s", line)
    report = {"video": str(args.video), "reference": str(args.identity or args.face)} | result.as_dict()
    if to_stdout:  # the JSON is the result: nothing else on stdout
        print(_json(report), end="")
        return
    if args.json is not None:
        _write_json(report, args.json, args.overwrite)
        logger.info("wrote %s", args.json)
    print(f"{result.mean:.4f}")


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _write_json(data: dict, out: Path, overwrite: bool) -> None:
    """`data` as JSON at `out`, whole or not at all."""
    from .files import write_atomically

    text = _json(data)
    write_atomically(out, lambda staged: staged.write_text(text, encoding="utf-8"), overwrite)


_COMMANDS = {"make-tiny": _make_tiny, "embed": _embed, "generate": _generate, "score": _score, "export": _export}


SIGNAL_EXITS = (130, 143)
"""The exit status after Ctrl-C (SIGINT) and after SIGTERM, as a shell gives them."""


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


def _say(args, line: str, this_rank_only: bool = False) -> None:
    """One line on stderr. Under --parallel every rank stops for the same reason (the arguments,
    the files and torchrun's environment are the same; a failure on rank 0 stops the others), so
    rank 0 alone says it; a refusal only this rank makes (`RankError`) is said by the rank."""
    from .parallel import is_writer

    if getattr(args, "parallel", None) is None or is_writer() or this_rank_only:
        sys.stderr.write(line + "\n")


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
        _say(args, f"error: {e}", isinstance(e, RankError))
        return 2
    except ImportError as e:  # an optional dependency (ONNX Runtime, SageAttention): its message says what to install
        _say(args, f"error: {first_line(e, 10_000)}")
        return 2
    except KeyboardInterrupt:
        _say(args, "cancelled: nothing was written")
        return SIGNAL_EXITS[0]
    except Terminated:
        _say(args, "terminated: nothing was written")
        return SIGNAL_EXITS[1]
    except OSError as e:  # the disk filled up, a folder vanished mid-run: written files are cleaned up
        sys.stderr.write(f"error: {e.strerror or e} ({e.filename or 'while writing'}); nothing was written\n")
        return 1
    finally:
        logger.removeHandler(handler)
    return 0
