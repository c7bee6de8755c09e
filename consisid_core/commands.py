"""The command line's commands (`cli.main` runs them): make-tiny, embed, generate, score, export,
each a function of the parsed arguments that prints its result on stdout and raises `ConsisIDError`
for what it refuses.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checks import check_number, check_prompt, decoded_frames
from .errors import ConsisIDError
from .lora import read_loras, with_loras
from .native import EXPORT_DTYPES, export

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


def _make_tiny(args) -> str:
    from .face import onnxruntime_offline
    from .tiny import make_tiny

    check_number("--seed", args.seed, 0, 2**32 - 1, integer=True)
    with onnxruntime_offline():  # diffusers imports ONNX Runtime to save the pipeline
        make_tiny(args.dir, seed=args.seed, kps=args.kps, native=args.native)
    return ""


def _embed(args) -> str:
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
    return f"{args.out}\n"


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


def _generate(args) -> str:
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
        return f"{args.out}\n"
    return ""


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
    image = read_image(args.start_image).convert("RGB") if args.start_image else None
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
        seed=args.seed, steps=args.steps, cfg=args.cfg, dynamic_cfg=args.dynamic_cfg,
        length=args.length, height=args.height, width=args.width, scheduler=args.scheduler,
        identity_strength=args.identity_strength, device=request.device, performance=request.performance,
        allow_oversize=args.allow_oversize, parallel=request.spec, tiling=Tiling() if args.vae_tiling else None,
    )
    labels = {
        "seed": "--seed", "steps": "--steps", "cfg": "--cfg", "identity strength": "--identity-strength"
    }
    if args.identity is not None:
        labels["identity"] = f"'{args.identity}'"
    run = Run.prepare(checkpoint.transformer_config, checkpoint.vae_config, checkpoint.scheduler_config,
                      request.dtype, options, labels=labels)
    check_segments(args.segments, run.options.length)
    # an even latent frame count decodes to more frames than asked: the frames the score will see
    decoded = decoded_frames(run.options.length, checkpoint.vae_config["temporal_compression_ratio"])
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


def _score(args) -> str:
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
        return _json(report)
    if args.json is not None:
        _write_json(report, args.json, args.overwrite)
        logger.info("wrote %s", args.json)
    return f"{result.mean:.4f}\n"


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _write_json(data: dict, out: Path, overwrite: bool) -> None:
    """`data` as JSON at `out`, whole or not at all."""
    from .files import write_atomically

    text = _json(data)
    write_atomically(out, lambda staged: staged.write_text(text, encoding="utf-8"), overwrite)


def _export(args) -> str:
    """The files written, one path a line on stdout: all of them, or none."""
    if args.model is None and not args.lora:
        raise ConsisIDError("export needs --model, --lora or both")
    if args.quant is not None and args.model is None:
        raise ConsisIDError(f"--quant {args.quant} stores a transformer in that format: give --model too")
    written = export(args.model, args.out, args.name, args.overwrite, EXPORT_DTYPES[args.dtype], args.lora, args.quant)
    return "".join(f"{path}\n" for path in written)


COMMANDS = {"make-tiny": _make_tiny, "embed": _embed, "generate": _generate, "score": _score, "export": _export}
"""Each command of `python -m consisid_core`, by its name: each returns its result, what `main` writes to
stdout (a path a line, a score, or the JSON report)."""
