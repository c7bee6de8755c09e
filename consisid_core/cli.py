"""`python -m consisid_core`: make-tiny, embed, generate, score, export.

A command's result goes to stdout, to be piped: the path written (embed, generate), the score
(score; `--json -`: its JSON). Logs and progress go to stderr.

Bad arguments exit with status 2 and one line on stderr, before any work and with nothing written.
Under torchrun (`generate --parallel`), a refusal that every rank makes is said once, by rank 0.
Ctrl-C (SIGINT) and SIGTERM stop a run with one line and exit 130 / 143, leaving no temporary
file or folder behind and nothing at `--out`.

This module is the parser and `main`; the commands themselves are `commands.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import DTYPES
from .commands import COMMANDS
from .errors import ConsisIDError, RankError, first_line
from .lora import lora_argument
from .native import EXPORT_DTYPES
from .performance import ATTENTION_BACKENDS, OFFLOAD_MODES
from .quant import FORMATS

logger = logging.getLogger("consisid_core")


class _Renamed(argparse.Action):
    """An option's old spelling: sets the new option's value and notes the rename for `warn_renamed`."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.renamed = {**getattr(namespace, "renamed", {}), option_string: self.new}


def renamed_option(parser: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
    """The option `new` (`kwargs` as `add_argument`'s), and `old` as a hidden spelling of it: scripts
    that use `old` keep working, `--help` shows only `new`, and `warn_renamed` names `new`."""
    action = parser.add_argument(new, **kwargs)
    parser.add_argument(old, dest=action.dest, type=action.type, action=_Renamed, new=new,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def warn_renamed(args: argparse.Namespace, log: logging.Logger = logger) -> None:
    """One warning for each old option spelling used (`renamed_option`)."""
    for old, new in getattr(args, "renamed", {}).items():
        log.warning("%s is now %s; the old name still works but will be removed", old, new)


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
        "export", help="a ConsisID transformer -> ComfyUI's CogVideoX layout (core UNETLoader) + its face layers")
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
                                    f"(ComfyUI v0.33 or later): {', '.join(FORMATS)}; the face layers stay as they are")
    export_parser.add_argument("--overwrite", action="store_true", help="replace existing files")


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
    renamed_option(gen, "--start-image", "--image", type=Path,
                   help="first frame (default: the aligned face, as the reference)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--steps", type=int, default=50)
    renamed_option(gen, "--cfg", "--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    gen.add_argument("--dynamic-cfg", action="store_true", help="the reference's cosine guidance schedule")
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="dpm",
                     help="dpm: CogVideoX DPM, as the reference; ddim: CogVideoX DDIM")
    gen.add_argument("--identity-strength", type=float,
                     help=f"scale of the face features, 0 to {MAX_IDENTITY_STRENGTH:g} (default: the checkpoint's "
                          "local_face_scale, 1 as trained)")
    renamed_option(gen, "--length", "--frames", type=int,
                   help="frame count, 4k+1; 8k+1 decode to exactly as many (default: the checkpoint's, 49)")
    gen.add_argument("--height", type=int, help="multiple of 16 (default: the checkpoint's, 480)")
    gen.add_argument("--width", type=int, help="multiple of 16 (default: the checkpoint's, 720)")
    gen.add_argument("--fps", type=int, default=8, help="frames per second of an .mp4")
    gen.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
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
                     help="a long video: this many segments of --length each, each starting from the last frame of "
                          "the one before; segment k uses seed + k - 1 (at most 32)")
    gen.add_argument("--colour-match", action="store_true",
                     help="give every later segment the colour (CIELAB mean and spread) of the first")
    gen.add_argument("--out", type=Path, required=True, help="a path ending in .mp4, or a folder for PNG frames")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an existing .mp4 at --out, or a folder of frames written by an earlier run")
    gen.add_argument("--score", action="store_true",
                     help="also log how well the video keeps the face (FaceSim-Arc, as `score`), per segment")


RANK_0_SECONDS = 60
"""How long a rank other than 0 that stops for the reason every rank stops for waits before it
exits (`_after_rank_0`): torchrun ends it as soon as rank 0 has exited."""

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
    if _this_rank_says(args) or this_rank_only:
        sys.stderr.write(line + "\n")


def _this_rank_says(args) -> bool:
    """Whether this process says what every process would: the only one, or --parallel's rank 0."""
    from .parallel import is_writer

    return getattr(args, "parallel", None) is None or is_writer()


def _after_rank_0(args) -> None:
    """Under --parallel, a rank other than 0 that refuses what every rank refuses leaves the exit to
    rank 0, which says why: torchrun stops the other ranks as soon as one exits, and had this one
    exited first, rank 0 would be stopped before its line. (SIGTERM's default action is back by
    now: torchrun's ends this wait without a word.)"""
    if not _this_rank_says(args):
        time.sleep(RANK_0_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if _this_rank_says(args):
        warn_renamed(args)
    try:
        with _terminating_cleanly():
            result = COMMANDS[args.command](args)
    except ConsisIDError as e:
        _say(args, f"error: {e}", isinstance(e, RankError))
        if not isinstance(e, RankError):
            _after_rank_0(args)
        return 2
    except ImportError as e:  # an optional dependency (ONNX Runtime, SageAttention): its message says what to install
        _say(args, f"error: {first_line(e, 10_000)}")
        _after_rank_0(args)
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
    sys.stdout.write(result)
    return 0
