"""Reading photos and writing frames: an .mp4, or a folder of lossless PNG frames.

Writes are atomic: the output appears whole at the end, or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConsisIDError

VIDEO_SUFFIXES = (".mp4",)


def read_image(path: str | os.PathLike) -> Image.Image:
    """A photo as PIL, EXIF rotation applied; unreadable files get a ConsisIDError."""
    path = Path(path)
    if not path.is_file():
        raise ConsisIDError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError) as e:
        raise ConsisIDError(f"'{path}' is not a readable image ({e})") from None


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] float in 0..1 -> uint8, rounded."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def check_output(out: str | os.PathLike) -> Path:
    """Fail before any work if `out` cannot be written: a missing parent, a non-empty folder."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ConsisIDError(f"cannot write '{out}': its folder '{out.parent}' does not exist")
    if out.suffix.lower() in VIDEO_SUFFIXES:
        if out.is_dir():
            raise ConsisIDError(f"cannot write the video '{out}': a folder of that name exists")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConsisIDError(
            f"'{out}' already exists; give a new or empty folder for PNG frames, or a path ending in .mp4"
        )
    if not os.access(out.parent, os.W_OK):
        raise ConsisIDError(f"cannot write '{out}': its folder is not writable")
    return out


def write_frames(frames: torch.Tensor, out: str | os.PathLike, fps: int = 8) -> Path:
    """Frames [F, H, W, 3] in 0..1 -> `out`: H.264 .mp4 if it ends so, else PNG frames in a folder."""
    out = check_output(out)
    pixels = to_uint8(frames)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if out.suffix.lower() in VIDEO_SUFFIXES:
            video = staging / out.name
            _write_mp4(pixels, video, fps)
            os.replace(video, out)
        else:
            for i, frame in enumerate(pixels):
                Image.fromarray(frame).save(staging / f"frame_{i:05d}.png")
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
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
