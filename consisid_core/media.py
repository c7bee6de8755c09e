"""Reading photos and writing frames: an .mp4, or a folder of lossless PNG frames.

Writes are atomic: the output appears whole at the end, or not at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConsisIDError, first_line
from .files import publish, shown

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
    """Fail before any work if `out` cannot be written: a missing or read-only folder, a link, a
    name the file system refuses, an existing file (unless `overwrite`), a non-empty folder (unless
    `overwrite` and it holds only frames written here: plain files named as this module names
    them), the current folder or one holding it. `suffixes` limits a file's kind (None: an .mp4 or
    a frames folder)."""
    out = Path(out)
    try:
        return _check_output(out, overwrite, suffixes)
    except OSError as e:  # a name longer than the file system takes, a folder that cannot be listed, …
        raise ConsisIDError(f"cannot write '{shown(out)}' ({e.strerror or e}); choose another name") from None


def _check_output(out: Path, overwrite: bool, suffixes: tuple[str, ...] | None) -> Path:
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
    else:
        # the frames folder is staged beside it and replaced whole: '.', '..' and 'x/..' cannot be
        if out.name in ("", "..") or Path.cwd().is_relative_to(os.path.abspath(out)):
            raise ConsisIDError(
                f"'{out}' is the current folder, holds it or ends in '..'; frames are written to a folder of their "
                "own: give a new folder's name, e.g. frames"
            )
        if out.exists():
            if not out.is_dir():
                raise ConsisIDError(f"'{out}' already exists and is not a folder; give a new folder for PNG frames")
            if not (overwrite and _holds_only_frames(out)) and any(out.iterdir()):
                raise ConsisIDError(
                    f"'{out}' already exists and is not empty; give a new or empty folder for PNG frames"
                    + (" (it holds more than frames written here)" if overwrite
                       else " (--overwrite replaces a folder of frames written here)")
                )
    try:  # the folder's permissions, read-only mounts and pseudo file systems all answer here
        probe = tempfile.mkdtemp(prefix=f".{out.name[:32]}.", suffix=".check", dir=out.parent)
    except OSError as e:
        raise ConsisIDError(f"cannot write in '{out.parent}' ({e.strerror or e}); choose another folder") from None
    os.rmdir(probe)
    return out


def _holds_only_frames(folder: Path) -> bool:
    """True when every entry of `folder` is a plain file (no folder, no link) named as `FrameWriter`
    names its frames: what --overwrite may delete."""
    return all(
        FRAME_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) for entry in os.scandir(folder)
    )


def write_frames(frames: torch.Tensor, out: str | os.PathLike, fps: int = 8, overwrite: bool = False) -> Path:
    """Frames [F, H, W, 3] in 0..1 -> `out`: H.264 .mp4 if it ends so, else PNG frames in a folder.

    `FrameWriter` fed once: written beside `out` and moved into place whole; nothing is replaced
    unless `overwrite`."""
    with FrameWriter(out, fps, overwrite) as writer:
        writer.write(frames)
    return writer.out


class FrameWriter:
    """A video written as its frames come (a long video segment by segment, each written as soon as
    it is decoded), still atomically: into a hidden staging folder beside `out`, moved into place
    when the `with` block ends without an error. An error, Ctrl-C or SIGTERM inside the block
    removes the staging folder, so nothing ever appears at `out` half-written.

    `out` ending in .mp4 gets H.264 (encoded frame by frame, so only the frames of one `write` are
    in memory), any other path a folder of lossless PNG frames `frame_00000.png`, …. Every frame
    must have the size of the first; nothing is replaced unless `overwrite`.
    """

    def __init__(self, out: str | os.PathLike, fps: int = 8, overwrite: bool = False):
        self.out = check_output(out, overwrite)
        self.fps, self.overwrite = fps, overwrite
        self.count = 0
        self._size: tuple[int, int] | None = None
        self._staging: Path | None = None
        self._container = self._stream = None

    def __enter__(self) -> FrameWriter:
        self._staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name[:32]}.", dir=self.out.parent))
        return self

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames [F, H, W, 3]: float in 0..1, or uint8 as written."""
        pixels = frames if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 else to_uint8(frames)
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ConsisIDError(f"frames must be [count, height, width, 3], found {list(pixels.shape)}")
        height, width = pixels.shape[1:3]
        if self._size is None:
            self._size = height, width
        elif self._size != (height, width):
            raise ConsisIDError(
                f"frames of {width}×{height} after frames of {self._size[1]}×{self._size[0]}: every frame of one "
                "video must have the same size (resize them first)"
            )
        if self.out.suffix.lower() in VIDEO_SUFFIXES:
            self._encode(pixels)
        else:
            for i, frame in enumerate(pixels, self.count):
                Image.fromarray(frame).save(self._staging / f"frame_{i:05d}.png")
        self.count += len(pixels)

    def _encode(self, pixels: np.ndarray | None) -> None:
        """H.264 packets of `pixels` into the staging file; None flushes the encoder."""
        import av

        if self._container is None:
            self._container = av.open(str(self._staging / self.out.name), mode="w")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = self._size[1], self._size[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "16"}
        for frame in [None] if pixels is None else pixels:
            video_frame = None if frame is None else av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                if self.count == 0:
                    raise ConsisIDError(f"no frames to write to '{self.out}'")
                if self._container is not None:
                    self._encode(None)
                    self._container.close()
                    self._container = None
                    publish(self._staging / self.out.name, self.out, self.overwrite)
                else:  # checked again: during a long run, something else may have been put there
                    check_output(self.out, self.overwrite)
                    publish(self._staging, self.out, self.overwrite)
        finally:
            if self._container is not None:  # an error mid-video: the half-written file goes with its folder
                with contextlib.suppress(Exception):
                    self._container.close()
            shutil.rmtree(self._staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading videos: an .mp4 (or any video PyAV reads) or a folder of PNG frames

MAX_VIDEO_FRAMES = 100_000
"""Frames a video may have (about an hour at 24 fps); a read decodes at most this many."""
MAX_KEPT_BYTES = 4 * 2**30
"""RGB bytes of the frames one read keeps (16 frames of 4K take 400 MB)."""


@dataclass(frozen=True)
class Video:
    """Frames read from a video: the `indices` asked for, in that order, each with its frame."""

    frames: np.ndarray
    """[n, H, W, 3] uint8 RGB, one per entry of `indices`."""
    indices: tuple[int, ...]
    """Each frame's position in the video (0-based)."""
    count: int
    """Frames in the whole video."""


def read_video(path: str | os.PathLike, choose: Callable[[int], Sequence[int]] | None = None) -> Video:
    """The frames of a video file, or of a folder of PNG frames (in natural name order:
    frame_2 before frame_10), that `choose(frame count)` names (None: all of them).

    Only the chosen frames are kept; a folder's other frames are not decoded. The frame count,
    pixels per frame and the bytes kept are bounded before decoding; a file that is not a video,
    a folder without PNG frames, and frames of another size than the first are refused in one
    line. A video file whose frames end before a chosen index (its header promised more) gives
    the frames it has, as OpenCV's reader does."""
    path = Path(path)
    if path.is_dir():
        return _read_frames_folder(path, choose)
    if not path.is_file():
        raise ConsisIDError(f"video '{path}' does not exist; give an .mp4 file or a folder of PNG frames")
    return _read_video_file(path, choose)


def _chosen(choose, count: int, size: tuple[int, int], where: str) -> list[int]:
    if count > MAX_VIDEO_FRAMES:
        raise ConsisIDError(f"'{where}' has {count} frames; videos are read up to {MAX_VIDEO_FRAMES}: cut it first")
    width, height = size
    if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
        raise ConsisIDError(
            f"'{where}' has frames of {width}×{height} pixels; frames are read up to "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels: scale it down first"
        )
    indices = list(range(count)) if choose is None else [int(i) for i in choose(count)]
    if any(not 0 <= i < count for i in indices):
        raise ConsisIDError(f"frame indices {indices} go beyond the {count} frames of '{where}'")
    kept = len(set(indices)) * width * height * 3
    if kept > MAX_KEPT_BYTES:
        raise ConsisIDError(
            f"reading {len(set(indices))} frames of {width}×{height} from '{where}' takes {kept / 2**30:.1f} GiB; "
            f"at most {MAX_KEPT_BYTES // 2**30} GiB are read at once: read fewer frames"
        )
    return indices


def _other_size(where: str, frame: str, size: tuple[int, int], first: tuple[int, int]) -> ConsisIDError:
    return ConsisIDError(
        f"'{where}': {frame} is {size[0]}×{size[1]} but the first frame is {first[0]}×{first[1]}; "
        "the frames of one video must all have one size"
    )


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"([0-9]+)", name)]


def _read_frames_folder(folder: Path, choose) -> Video:
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()]
    files.sort(key=lambda p: _natural(p.name))
    if not files:
        raise ConsisIDError(f"folder '{folder}' holds no PNG frames; give an .mp4 file or a folder of .png frames")
    if len(files) > MAX_VIDEO_FRAMES:
        raise ConsisIDError(
            f"'{folder}' has {len(files)} frames; videos are read up to {MAX_VIDEO_FRAMES}: cut it first"
        )
    sizes = []
    for file in files:  # the headers only: sizes are known before any frame is decoded
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    sizes.append(image.size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ConsisIDError(f"'{file}' is not a readable PNG frame ({first_line(e)})") from None
        if sizes[-1] != sizes[0]:
            raise _other_size(str(folder), f"frame '{file.name}'", sizes[-1], sizes[0])
    indices = _chosen(choose, len(files), sizes[0], str(folder))
    kept = {i: np.asarray(read_image(files[i]).convert("RGB")) for i in sorted(set(indices))}
    for i, frame in kept.items():  # an EXIF rotation can turn a frame
        if frame.shape[1::-1] != sizes[0]:
            raise _other_size(str(folder), f"frame '{files[i].name}'", frame.shape[1::-1], sizes[0])
    frames = np.stack([kept[i] for i in indices]) if indices else np.zeros((0, sizes[0][1], sizes[0][0], 3), np.uint8)
    return Video(frames, tuple(indices), len(files))


def _read_video_file(path: Path, choose) -> Video:
    import av

    def unreadable(e: Exception) -> ConsisIDError:
        return ConsisIDError(
            f"'{path}' is not a readable video ({first_line(e)}); give an .mp4 file or a folder of PNG frames"
        )

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ConsisIDError(f"'{path}' holds no video stream; give an .mp4 file or a folder of PNG frames")
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            count = stream.frames
            if count <= 0:  # not in the header: count the packets (no decoding)
                for packet in container.demux(stream):
                    count += packet.size > 0
                    if count > MAX_VIDEO_FRAMES:
                        break
        if count <= 0:
            raise ConsisIDError(f"'{path}' holds no frames; give a video with frames")
        indices = _chosen(choose, count, size, str(path))
        wanted = set(indices)
        kept: dict[int, np.ndarray] = {}
        if wanted:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                for i, frame in enumerate(container.decode(stream)):
                    if (frame.width, frame.height) != size:
                        raise _other_size(str(path), f"frame {i}", (frame.width, frame.height), size)
                    if i in wanted:
                        kept[i] = frame.to_ndarray(format="rgb24")
                    if i >= max(wanted):
                        break
    except ConsisIDError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise unreadable(e) from None
    read = [i for i in indices if i in kept]
    frames = np.stack([kept[i] for i in read]) if read else np.zeros((0, size[1], size[0], 3), np.uint8)
    return Video(frames, tuple(read), count)
