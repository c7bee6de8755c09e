"""Reading photos and writing frames: an .mp4, or a folder of lossless PNG frames.

Writes are atomic: the output appears whole at the end, or not at all.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConsisIDError, first_line
from .files import publish

VIDEO_SUFFIXES = (".mp4",)
MAX_IMAGE_PIXELS = 64_000_000
"""Photos are read up to 64 megapixels (8000 × 8000); the face models shrink them to 1024 px anyway."""
FRAME_NAME = re.compile(r"frame_[0-9]{5}\.png")


def read_image(path: str | os.PathLike) -> Image.Image:
    """A photo as PIL, EXIF rotation applied; unreadable or oversized files get a ConsisIDError
    before their pixels are decoded."""
    path = Path(path)
    if not path.is_file():
        raise ConsisIDError(f"image '{path}' " + ("is a folder: give an image file" if path.is_dir() else "does not exist"))
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 megapixels on; the bound below is lower and refuses those in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
                raise ConsisIDError(
                    f"'{path}' declares {width}×{height} pixels; photos are read up to "
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels: scale it down first"
                )
            image.load()
            return ImageOps.exif_transpose(image)
    except ConsisIDError:  # a ValueError too: not to be wrapped as unreadable below
        raise
    except Image.DecompressionBombError:
        raise ConsisIDError(
            f"'{path}' declares more pixels than any photo (a decompression bomb?); photos are read up to "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels: scale it down first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        first = first_line(e)
        raise ConsisIDError(f"'{path}' is not a readable image ({first})") from None


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] float in 0..1 -> uint8, rounded; NaN or infinite pixels are refused."""
    if frames.is_floating_point() and not torch.isfinite(frames).all():
        raise ConsisIDError("the image holds NaN or infinite pixels; give a normal image")
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def check_output(out: str | os.PathLike, overwrite: bool = False, suffixes: tuple[str, ...] | None = None) -> Path:
    """Fail before any work if `out` cannot be written: a missing or read-only folder, a link, an
    existing file (unless `overwrite`), a non-empty folder (unless `overwrite` and it holds only
    frames written here). `suffixes` limits a file's kind (None: an .mp4 or a frames folder)."""
    out = Path(out)
    if out.is_symlink():
        raise ConsisIDError(f"'{out}' is a symbolic link; give the path of a new file or folder instead")
    if not out.parent.is_dir():
        raise ConsisIDError(f"cannot write '{out}': its folder '{out.parent}' does not exist")
    is_file_output = suffixes is not None or out.suffix.lower() in VIDEO_SUFFIXES
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise ConsisIDError(f"'{out}' must be a path ending in {' or '.join(suffixes)}")
    if is_file_output:
        if out.is_dir():
            raise ConsisIDError(f"cannot write '{out}': a folder of that name exists")
        if out.exists() and not overwrite:
            raise ConsisIDError(f"'{out}' already exists; give a new name, or pass --overwrite to replace it")
    elif out.exists():
        if not out.is_dir():
            raise ConsisIDError(f"'{out}' already exists and is not a folder; give a new folder for PNG frames")
        names = [p.name for p in out.iterdir()]
        if names and not (overwrite and all(FRAME_NAME.fullmatch(n) for n in names)):
            raise ConsisIDError(
                f"'{out}' already exists and is not empty; give a new or empty folder for PNG frames"
                + ("" if overwrite else " (--overwrite replaces a folder of frames written here)")
            )
    try:  # the folder's permissions, read-only mounts and pseudo file systems all answer here
        probe = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".check", dir=out.parent)
    except OSError as e:
        raise ConsisIDError(f"cannot write in '{out.parent}' ({e.strerror or e}); choose another folder") from None
    os.rmdir(probe)
    return out


def write_frames(frames: torch.Tensor, out: str | os.PathLike, fps: int = 8, overwrite: bool = False) -> Path:
    """Frames [F, H, W, 3] in 0..1 -> `out`: H.264 .mp4 if it ends so, else PNG frames in a folder.

    Written beside `out` and moved into place whole; nothing is replaced unless `overwrite`."""
    out = check_output(out, overwrite)
    pixels = to_uint8(frames)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if out.suffix.lower() in VIDEO_SUFFIXES:
            video = staging / out.name
            _write_mp4(pixels, video, fps)
            publish(video, out, overwrite)
        else:
            for i, frame in enumerate(pixels):
                Image.fromarray(frame).save(staging / f"frame_{i:05d}.png")
            publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_mp4(pixels: np.ndarray, path: Path, fps: int) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16"}
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
