"""From a photo to an `Identity`: the reference's `process_face_embeddings_infer` (is_align_face=True).

Steps, as in `diffusers.pipelines.consisid.consisid_utils`: long side ≤ 1024 (cv2 Lanczos-4);
antelopev2 detection and its raw 512-d embedding of the chosen face; facexlib RetinaFace landmarks and
the 512×512 FFHQ-template alignment; BiSeNet parsing with background classes whitened; the greyscale
copy resized to the EVA input → EVA embedding (L2-normalised) and hidden states;
`id_cond = cat(antelopev2 embedding, EVA embedding)`.

Where this differs from the reference, on purpose:
- the reference aligns the RetinaFace face nearest the image centre even when it embedded another
  (the largest) face; here the aligned face is always the chosen one (the RetinaFace face whose
  centre is nearest the chosen box's centre, falling back to the antelopev2 keypoints);
- `face_index` picks another face (counted left to right); the default is the largest, as there;
- RGBA is composited on white, 16-bit and float images are scaled, not truncated.
For a photo with one face the result is the reference's, to float round-off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FaceError
from ..identity import Identity
from ..media import read_image
from .models import RETINAFACE_THRESH, FaceModels

logger = logging.getLogger(__name__)

MAX_LONG_SIDE = 1024
ALIGN_SIZE = 512
FFHQ_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]]
)
"""facexlib FaceRestoreHelper's 5-point template for a 512×512 face (crop_ratio 1)."""
BORDER_VALUE = (135, 133, 132)
PARSING_BACKGROUND = (0, 16, 18, 7, 8, 9, 14, 15)
"""BiSeNet classes whitened out: background, clothes, hat, ears, earring, neck, necklace."""
PARSING_MEAN = (0.485, 0.456, 0.406)
PARSING_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FaceResult:
    identity: Identity
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 of the chosen face in pixels of the image as given (before any resize)."""
    mask: torch.Tensor
    """[512, 512] bool: the parsed face (True) on the aligned crop; False is whitened background."""
    aligned_face: torch.Tensor
    """[512, 512, 3] uint8 RGB: the aligned crop before parsing (the reference's `cropped_faces[0]`)."""
    face_index: int
    """The chosen face, counted left to right among `face_count` faces."""
    face_count: int


def extract_identity(
    face_models: FaceModels,
    image: Any,
    face_index: int | None = None,
    source_name: str = "",
) -> FaceResult:
    """Make the identity of one face in `image` (path, PIL image, numpy or torch array; see `to_rgb_uint8`).

    `face_index`: None takes the largest face; an int picks a face counted left to right (0 = leftmost).
    """
    name = source_name or (str(image) if isinstance(image, (str, os.PathLike)) else "the face image")
    rgb = to_rgb_uint8(image, name)
    in_h, in_w = rgb.shape[:2]
    rgb = resize_long_side(rgb, MAX_LONG_SIDE)
    h, w = rgb.shape[:2]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    with torch.inference_mode():
        return _extract(face_models, bgr, face_index, name, (in_w / w, in_h / h))


def extract_identities(
    face_models: FaceModels,
    images: Sequence[Any],
    face_index: int | None = None,
    source_names: Sequence[str] | None = None,
) -> list[FaceResult]:
    """One `FaceResult` per image (same `face_index` rule for each)."""
    names = list(source_names) if source_names is not None else [""] * len(images)
    if len(names) != len(images):
        raise FaceError(f"{len(images)} images but {len(names)} source names")
    return [extract_identity(face_models, im, face_index, n) for im, n in zip(images, names)]


def to_rgb_uint8(image: Any, name: str = "the face image") -> np.ndarray:
    """Any photo → [H, W, 3] uint8 RGB.

    Accepts a file path, a PIL image (EXIF rotation applied), or an array/tensor [H, W], [H, W, 1|3|4]
    or ComfyUI's [1, H, W, C] float 0..1; uint8, uint16 (scaled to 8 bits), bool or float (0..1).
    Alpha is composited on white; grey is repeated to three channels.
    """
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = _pil_to_array(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype == torch.bfloat16:
            image = image.float()
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise FaceError(f"{name}: expected an image [H, W], [H, W, 3] or [H, W, 4], found shape {list(arr.shape)}")
    arr = _to_unit_float(arr, name) if arr.dtype != np.uint8 else arr
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[-1] == 4:
        rgb, alpha = arr[..., :3].astype(np.float32), arr[..., 3:].astype(np.float32)
        top = 1.0 if arr.dtype != np.uint8 else 255.0
        arr = rgb * (alpha / top) + top * (1.0 - alpha / top)
    if arr.dtype != np.uint8:
        top = 1.0 if arr.max(initial=0) <= 1.0 + 1e-6 and not np.issubdtype(arr.dtype, np.integer) else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _pil_to_array(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float32)
        return arr / (65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return np.asarray(im.convert("RGBA"))
    if im.mode == "F":
        return np.asarray(im) / 255.0
    return np.asarray(im.convert("RGB"))


def _to_unit_float(arr: np.ndarray, name: str) -> np.ndarray:
    """Non-uint8 arrays → float32 in 0..1."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return arr.astype(np.float32) / top
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise FaceError(f"{name}: the image has NaN or infinite values")
        return np.clip(arr / 255.0 if arr.max(initial=0) > 1.0 + 1e-3 else arr, 0.0, 1.0)
    raise FaceError(f"{name}: unsupported pixel type {arr.dtype}")


def resize_long_side(image: np.ndarray, long_side: int = MAX_LONG_SIDE) -> np.ndarray:
    """The reference's `resize_numpy_image_long`: shrink (never enlarge) with cv2 Lanczos-4."""
    import cv2

    h, w = image.shape[:2]
    if max(h, w) <= long_side:
        return image
    k = long_side / max(h, w)
    return cv2.resize(image, (int(w * k), int(h * k)), interpolation=cv2.INTER_LANCZOS4)


def _area(box) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def pick_face(boxes: list, face_index: int | None, name: str, kind: str) -> tuple[int, int]:
    """(index into boxes, index counted left to right) of the largest face or of `face_index`."""
    left_to_right = sorted(range(len(boxes)), key=lambda i: (boxes[i][0] + boxes[i][2]) / 2)
    if face_index is None:
        chosen = sorted(range(len(boxes)), key=lambda i: _area(boxes[i]))[-1]  # as the reference
    else:
        if not -len(boxes) <= face_index < len(boxes):
            raise FaceError(
                f"face_index {face_index} is out of range: {name} has {len(boxes)} face(s) ({kind}); "
                f"use 0..{len(boxes) - 1} (left to right) or leave it empty for the largest face"
            )
        chosen = left_to_right[face_index]
    return chosen, left_to_right.index(chosen)


@dataclass(frozen=True)
class _Chosen:
    """The face chosen in the (resized) photo, as the detectors saw it."""

    box: np.ndarray
    landmark: np.ndarray
    """The five points the face is aligned on."""
    kps: np.ndarray
    """The five points kept in the identity."""
    embedding: np.ndarray | None
    """antelopev2's embedding, None when only RetinaFace found faces."""
    position: int
    count: int


def _extract(models: FaceModels, bgr: np.ndarray, face_index, name: str, scale: tuple[float, float]) -> FaceResult:
    face = _choose_face(models, bgr, face_index, name)
    aligned = _align(bgr, face.landmark, name)
    embedding = face.embedding
    if embedding is None:
        logger.warning("%s: antelopev2 found no face; embedding the aligned RetinaFace crop instead", name)
        embedding = models.recognizer.get_feat(aligned)
    ante = torch.from_numpy(np.asarray(embedding)).to(models.device, models.dtype)
    if ante.ndim == 1:
        ante = ante.unsqueeze(0)
    pixels, background = _parse(models, aligned)
    id_cond, hidden = _eva_condition(models, pixels, background, ante)
    face_pixels = torch.where(background, torch.ones_like(pixels), pixels)
    face_image = (face_pixels[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    identity = Identity(
        id_cond=id_cond.cpu(),
        id_vit_hidden=tuple(x.cpu() for x in hidden),
        kps=torch.as_tensor(np.asarray(face.kps), dtype=torch.float32).reshape(5, 2).clone(),
        face_image=torch.from_numpy(face_image),
        metadata={
            "source_image": name,
            "face_models": str(models.source),
            "face_index": str(face.position),
            "face_count": str(face.count),
        },
    )
    sx, sy = scale
    box = face.box
    box_in = (float(box[0] * sx), float(box[1] * sy), float(box[2] * sx), float(box[3] * sy))
    aligned_rgb = torch.from_numpy(np.ascontiguousarray(aligned[:, :, ::-1]))
    return FaceResult(identity, box_in, (~background)[0, 0].cpu(), aligned_rgb, face.position, face.count)


def _choose_face(models: FaceModels, bgr: np.ndarray, face_index, name: str) -> _Chosen:
    """Detect the faces (antelopev2, else RetinaFace), choose one, and embed it with antelopev2."""
    from insightface.app.common import Face

    det, kpss = models.detector.detect(bgr, max_num=0, metric="default")
    ante_boxes = [det[i, :4] for i in range(det.shape[0])]
    retina = models.retinaface.detect_faces(bgr, RETINAFACE_THRESH)
    retina_boxes = [r[:4] for r in retina]
    retina_kps = [np.array([[r[i], r[i + 1]] for i in range(5, 15, 2)]) for r in retina]
    if ante_boxes:
        chosen, position = pick_face(ante_boxes, face_index, name, "antelopev2")
        box = ante_boxes[chosen]
        embedding = models.recognizer.get(bgr, Face(bbox=box, kps=kpss[chosen], det_score=det[chosen, 4]))
        landmark = _matching_landmarks(box, retina_boxes, retina_kps)
        if landmark is None:
            logger.warning("%s: RetinaFace did not find the chosen face; aligning on antelopev2 keypoints", name)
            landmark = kpss[chosen]
        face = _Chosen(box, landmark, kpss[chosen], embedding, position, len(ante_boxes))
    elif retina_boxes:
        chosen, position = pick_face(retina_boxes, face_index, name, "RetinaFace")
        kps = retina_kps[chosen]
        face = _Chosen(retina_boxes[chosen], kps, kps, None, position, len(retina_boxes))
    else:
        h, w = bgr.shape[:2]
        raise FaceError(
            f"no face found in {name} ({w}×{h} after resizing): use a clearer, larger, well-lit, frontal "
            "photo with one face"
        )
    if face.count > 1:
        logger.info(
            "%s: %d faces found; using face %d counted left to right (%s), box %s", name, face.count, face.position,
            "the largest" if face_index is None else "face_index", np.round(face.box).tolist(),
        )
    return face


def _align(bgr: np.ndarray, landmark: np.ndarray, name: str) -> np.ndarray:
    """The 512×512 crop with the five points on the FFHQ template (BGR)."""
    import cv2

    affine = cv2.estimateAffinePartial2D(landmark, FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    if affine is None:
        raise FaceError(f"{name}: the face's landmarks are degenerate; use a clearer, frontal photo")
    return cv2.warpAffine(
        bgr, affine, (ALIGN_SIZE, ALIGN_SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE
    )


def _parse(models: FaceModels, aligned: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The aligned crop as RGB pixels [1, 3, H, W] in 0..1 on the models' device, and BiSeNet's
    background mask [1, 1, H, W] (the classes `PARSING_BACKGROUND`)."""
    import cv2

    rgb = torch.from_numpy(np.ascontiguousarray(cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)).transpose(2, 0, 1))
    pixels = (rgb.float().unsqueeze(0) / 255.0).to(models.device)
    parsing = models.parser(_normalize(pixels, PARSING_MEAN, PARSING_STD))[0].argmax(dim=1, keepdim=True)
    return pixels, sum(parsing == i for i in PARSING_BACKGROUND).bool()


def _eva_condition(models: FaceModels, pixels: torch.Tensor, background: torch.Tensor, ante: torch.Tensor):
    """(`id_cond`, EVA hidden states) of the parsed face: EVA sees it grey on white."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    white = torch.ones_like(pixels)
    gray = (0.299 * pixels[:, 0:1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]).repeat(1, 3, 1, 1)
    eva_input = resize(torch.where(background, white, gray), models.eva.image_size, InterpolationMode.BICUBIC)
    eva_input = _normalize(eva_input, models.eva.image_mean, models.eva.image_std)
    eva_embedding, hidden = models.eva(eva_input.to(models.dtype))
    eva_embedding = eva_embedding / torch.norm(eva_embedding, 2, 1, True)
    return torch.cat([ante, eva_embedding], dim=-1), hidden


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision's `normalize`, same arithmetic."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub(mean).div(std)


def _matching_landmarks(box, retina_boxes, retina_kps):
    """Landmarks of the RetinaFace face whose centre is nearest `box`'s centre and inside it."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    best, best_d = None, None
    for rb, kps in zip(retina_boxes, retina_kps):
        rx, ry = (rb[0] + rb[2]) / 2, (rb[1] + rb[3]) / 2
        if not (box[0] <= rx <= box[2] and box[1] <= ry <= box[3]):
            continue
        d = (rx - cx) ** 2 + (ry - cy) ** 2
        if best_d is None or d < best_d:
            best, best_d = kps, d
    return best
