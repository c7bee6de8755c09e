"""FaceSim-Arc: how well a video keeps a face, measured as ConsisID's own evaluation
(`eval/get_facesim_fid.py`, its "arc score") does, with the checkpoint's antelopev2 detector and
recogniser; and the one definition of a long video's segment scores (`segment_indices`). The
protocol, step by step: docs/identity-score.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_number
from .errors import ConsisIDError, FaceError, IdentityError
from .face.extract import pick_face
from .identity import Identity
from .media import to_uint8

logger = logging.getLogger(__name__)

DEFAULT_FRAMES_SAMPLED = 16
MAX_FRAMES_SAMPLED = 1024
DETECTION_SIZE = (320, 320)
"""The official script's detector input (identity extraction uses 640 × 640)."""
PAD_SCALE = 1.25
PAD_VALUE = (128, 128, 128)


@dataclass(frozen=True)
class FrameScore:
    index: int
    """The frame's position in the video (0-based)."""
    score: float | None
    """Cosine similarity clipped at 0; None where no face was found."""


@dataclass(frozen=True)
class IdentityScore:
    """The FaceSim-Arc of one video (or one segment of it)."""

    frames: tuple[FrameScore, ...]
    """The sampled frames, in order."""
    count: int
    """Frames in the video."""

    @property
    def mean(self) -> float:
        """The video's FaceSim-Arc: the mean over the frames with a face, 0 without any."""
        scores = [f.score for f in self.frames if f.score is not None]
        return float(np.mean(scores)) if scores else 0.0

    @property
    def without_face(self) -> list[int]:
        """The sampled frames without a face (each once)."""
        return sorted({f.index for f in self.frames if f.score is None})

    def summary(self) -> str:
        """One line: the score, how many frames it averages, which had no face."""
        faced = sum(f.score is not None for f in self.frames)
        line = f"FaceSim-Arc {self.mean:.4f} (mean of {faced} of {len(self.frames)} sampled frames of {self.count}"
        if self.without_face:
            plural = "s" if len(self.without_face) > 1 else ""
            line += f"; no face in frame{plural} " + ", ".join(map(str, self.without_face))
        return line + ")"

    def per_frame(self) -> str:
        """One line per sampled frame: `frame 12: 0.4123` or `frame 12: no face`."""
        return "\n".join(
            f"frame {f.index}: " + ("no face" if f.score is None else f"{f.score:.4f}") for f in self.frames
        )

    def as_dict(self) -> dict:
        return {
            "facesim_arc": self.mean,
            "video_frames": self.count,
            "frames_sampled": len(self.frames),
            "frames": [{"frame": f.index, "score": f.score} for f in self.frames],
            "no_face": self.without_face,
        }


def check_frames_sampled(value, name: str = "frames_sampled") -> int:
    return check_number(name, value, 1, MAX_FRAMES_SAMPLED, "the official protocol samples 16", integer=True)


def sample_indices(count: int, frames_sampled: int = DEFAULT_FRAMES_SAMPLED) -> list[int]:
    """The official sampling: evenly spaced, first and last included, rounded down."""
    return np.linspace(0, count - 1, frames_sampled, dtype=int).tolist()


def _largest_face_embedding(face_models, bgr: np.ndarray) -> np.ndarray | None:
    from insightface.app.common import Face

    boxes, kps = face_models.detector.detect(bgr, input_size=DETECTION_SIZE, max_num=0, metric="default")
    if boxes.shape[0] == 0:
        return None
    chosen, _ = pick_face([boxes[i, :4] for i in range(boxes.shape[0])], None, "", "antelopev2")
    face = Face(bbox=boxes[chosen, :4], kps=kps[chosen], det_score=boxes[chosen, 4])
    return face_models.recognizer.get(bgr, face)


def face_embedding(face_models, rgb: np.ndarray) -> np.ndarray | None:
    """The recognition embedding of the largest face in an [H, W, 3] uint8 RGB image (searched
    again with a grey border when none is found); None without a face."""
    import cv2

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    embedding = _largest_face_embedding(face_models, bgr)
    if embedding is None:
        h, w = bgr.shape[:2]
        dy, dx = int(h * (PAD_SCALE - 1)), int(w * (PAD_SCALE - 1))
        padded = cv2.copyMakeBorder(bgr, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=PAD_VALUE)
        embedding = _largest_face_embedding(face_models, padded)
    return embedding


def identity_embedding(identity: Identity, face_models, where: str = "the identity") -> np.ndarray:
    """The antelopev2 embedding an identity holds (the first part of `id_cond`), once its width is
    that of these face models' (an identity of another checkpoint is refused)."""
    width, expected = identity.id_cond.shape[-1], face_models.id_dim
    if width != expected:
        raise IdentityError(
            f"{where} does not fit these face models: its id_cond is {width} wide, these face models make "
            f"{expected} ({face_models.recognizer_dim} of it the recognition embedding scored here). "
            "Make the identity with the same checkpoint's face models."
        )
    return identity.id_cond[0, : face_models.recognizer_dim].float().numpy()


def photo_embedding(face_models, rgb: np.ndarray, name: str) -> np.ndarray:
    """The reference embedding of a photo, found as in a frame; a photo without a face is refused."""
    embedding = face_embedding(face_models, rgb)
    if embedding is None:
        raise FaceError(f"no face found in {name}: use a clearer, larger, well-lit, frontal photo with one face")
    return embedding


def frame_score(reference: np.ndarray, embedding: np.ndarray) -> float:
    """The cosine similarity clipped at 0, computed as the official script does (float32 torch)."""
    similarity = torch.nn.functional.cosine_similarity(torch.tensor(reference), torch.tensor(embedding), dim=-1)
    return max(0.0, similarity.item())


def score_frames(
    face_models,
    reference: np.ndarray,
    frames: np.ndarray,
    indices: Sequence[int],
    count: int,
    progress: Callable[[int], None] | None = None,
) -> IdentityScore:
    """Score sampled frames ([n, H, W, 3] uint8 RGB, frame `indices[k]` of a `count`-frame video).
    A frame sampled twice is looked at once. `progress(k)` after each frame (it may raise to stop)."""
    if len(frames) != len(indices):
        raise ConsisIDError(f"{len(frames)} frames but {len(indices)} frame indices")
    seen: dict[int, float | None] = {}
    scores = []
    with torch.inference_mode():
        for k, (frame, index) in enumerate(zip(frames, indices)):
            if index not in seen:
                embedding = face_embedding(face_models, frame)
                seen[index] = None if embedding is None else frame_score(reference, embedding)
            scores.append(FrameScore(int(index), seen[index]))
            if progress is not None:
                progress(k + 1)
    return IdentityScore(tuple(scores), count)


def score_video(
    face_models,
    reference: np.ndarray,
    frames: torch.Tensor | np.ndarray,
    frames_sampled: int = DEFAULT_FRAMES_SAMPLED,
    progress: Callable[[int], None] | None = None,
) -> IdentityScore:
    """FaceSim-Arc of frames in memory ([F, H, W, 3], float 0..1 or uint8), sampled as the protocol
    samples a video file."""
    check_frames_sampled(frames_sampled)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ConsisIDError(f"expected frames [F, H, W, 3], found shape {list(frames.shape)}")
    indices = sample_indices(len(frames), frames_sampled)
    chosen = frames[indices]
    pixels = to_uint8(chosen) if isinstance(chosen, torch.Tensor) and chosen.is_floating_point() else np.asarray(chosen)
    if pixels.dtype != np.uint8:
        raise ConsisIDError(f"frames must be float 0..1 or uint8, found {pixels.dtype}")
    return score_frames(face_models, reference, pixels, indices, len(frames), progress)


def segment_starts(count: int, frames_per_segment: int) -> list[int]:
    """Where segments 2, 3, … begin in a video joined as chained segments are (each segment of
    `frames_per_segment` frames begins with the previous one's last frame, which appears once):
    frames k·(F − 1) for k ≥ 1."""
    if frames_per_segment < 2:
        return []
    step = frames_per_segment - 1
    return list(range(step, count - 1, step))


def segment_bounds(count: int, frames_per_segment: int) -> list[tuple[int, int]]:
    """(first, last) frame of each segment of a `count`-frame long video whose segments of
    `frames_per_segment` frames are chained (each begins with the previous one's last frame, which
    the video holds once); the last segment may be shorter. One segment below 2 frames per segment."""
    starts = [0, *segment_starts(count, frames_per_segment)]
    return list(zip(starts, [*starts[1:], count - 1]))


def segment_indices(
    count: int, frames_per_segment: int, frames_sampled: int = DEFAULT_FRAMES_SAMPLED
) -> list[list[int]]:
    """The frames that score each segment of a long video (`segment_bounds`), as positions in the
    whole video. A segment's score is the protocol's score of the segment as a video of its own:
    `frames_sampled` frames sampled from its own frames (`sample_indices`)."""
    return [
        [first + i for i in sample_indices(last - first + 1, frames_sampled)]
        for first, last in segment_bounds(count, frames_per_segment)
    ]


class SampledFrames:
    """Keeps, of a video of `count` frames arriving piece by piece (as a long video is written,
    segment after segment) or whole, only the frames the protocol samples: those of each segment
    of `frames_per_segment` frames (`segment_indices`) and those of the whole video.
    """

    def __init__(self, count: int, frames_per_segment: int = 0, frames_sampled: int = DEFAULT_FRAMES_SAMPLED):
        check_frames_sampled(frames_sampled)
        self.count = count
        self.bounds = segment_bounds(count, frames_per_segment)
        self.segments = segment_indices(count, frames_per_segment, frames_sampled)
        self.whole = sample_indices(count, frames_sampled)
        self._wanted = set(self.whole).union(*self.segments)
        self._kept: dict[int, np.ndarray] = {}
        self._seen = 0

    @classmethod
    def of_segments(cls, segments: int, frames_per_segment: int, frames_sampled: int = DEFAULT_FRAMES_SAMPLED):
        """For `segments` chained segments of `frames_per_segment` frames each."""
        return cls(segments * frames_per_segment - (segments - 1), frames_per_segment, frames_sampled)

    @property
    def looked_at(self) -> int:
        """How many frames `scores` looks at (each sampled frame once)."""
        return len(self._wanted)

    def add(self, frames: torch.Tensor) -> None:
        """The video's next frames, [F, H, W, 3] float 0..1 (as they are written)."""
        for j in range(len(frames)):
            if self._seen + j in self._wanted:
                self._kept[self._seen + j] = to_uint8(frames[j : j + 1])[0]
        self._seen += len(frames)

    def scores(
        self, face_models, reference: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> tuple[list[IdentityScore], IdentityScore]:
        """(each segment's score, the whole video's score); every frame is looked at once.
        `progress(k)` after each frame (it may raise to stop)."""
        if self._seen != self.count:
            raise ConsisIDError(f"{self._seen} frames were added, the video has {self.count}")
        everything = sorted(self._wanted)
        frames = np.stack([self._kept[i] for i in everything])
        result = score_frames(face_models, reference, frames, everything, self.count, progress)
        by_index = {f.index: f for f in result.frames}

        def of(indices: list[int], count: int, offset: int) -> IdentityScore:
            return IdentityScore(tuple(FrameScore(i - offset, by_index[i].score) for i in indices), count)

        parts = [of(indices, last - first + 1, first) for indices, (first, last) in zip(self.segments, self.bounds)]
        return parts, of(self.whole, self.count, 0)


def plot(result: IdentityScore, boundaries: Sequence[int] = (), size: tuple[int, int] = (512, 256)):
    """A small chart (PIL RGB image): the score of each sampled frame against its position in the
    video (0 to 1 upwards), frames without a face as red crosses on the axis, the mean as a dashed
    line, segment starts as grey vertical lines."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 36, 10, 22, 22
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    span = max(result.count - 1, 1)

    def x(index: float) -> float:
        return left + (width - left - right) * index / span

    def y(score: float) -> float:
        return top + (height - top - bottom) * (1.0 - score)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(left, y(tick)), (width - right, y(tick))], fill=(230, 230, 230))
        draw.text((4, y(tick) - 6), f"{tick:.2f}", fill=(90, 90, 90))
    for start in boundaries:
        draw.line([(x(start), top), (x(start), height - bottom)], fill=(150, 150, 150), width=2)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=(0, 0, 0))
    draw.text((left, height - bottom + 6), "frame 0", fill=(90, 90, 90))
    draw.text((width - right - 60, height - bottom + 6), f"frame {result.count - 1}", fill=(90, 90, 90))
    if any(f.score is not None for f in result.frames):
        mean_y = y(result.mean)
        for start in range(left, width - right, 8):
            draw.line([(start, mean_y), (min(start + 4, width - right), mean_y)], fill=(40, 120, 220))
    points = [(x(f.index), y(f.score)) for f in result.frames if f.score is not None]
    if len(points) > 1:
        draw.line(points, fill=(20, 20, 20), width=1)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(20, 20, 20))
    for index in result.without_face:
        px, py = x(index), y(0.0)
        draw.line([(px - 4, py - 4), (px + 4, py + 4)], fill=(220, 30, 30), width=2)
        draw.line([(px - 4, py + 4), (px + 4, py - 4)], fill=(220, 30, 30), width=2)
    title = f"FaceSim-Arc {result.mean:.3f} (dashed), {len(result.frames)} sampled frames"
    draw.text((left, 4), title, fill=(40, 120, 220))
    return image
