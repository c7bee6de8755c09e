"""A face identity for ConsisID and its `.safetensors` file.

An identity is what the face models make of one photo and all the transformer needs of it:
`id_cond` (the 512-d antelopev2 embedding joined to the 768-d EVA embedding, [1, 1280] in the
real model), `id_vit_hidden` (EVA hidden states at five depths, each [1, 577, 1024]), the five
face keypoints `kps` and `face_image`, the aligned face that the reference uses as first frame.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import check_tensors
from .errors import ConsisIDError, IdentityError
from .files import shown, write_atomically

FORMAT = "consisid-identity"
VERSION = "1"
MAX_FILE_BYTES = 256 * 2**20
"""A real identity is about 13 MB (five [1, 577, 1024] float32 hidden states and a 512² face)."""
MAX_SCALES = 64
MAX_FACE_SIDE = 4096
MIN_FACE_SIDE = 16
MAX_VALUE = 1e4
"""Embeddings and hidden states of the face models stay far below this; keypoints are pixels."""
_KEY = re.compile(r"id_cond|kps|face_image|id_vit_hidden\.(0|[1-9][0-9]?)")


@dataclass(frozen=True)
class Identity:
    id_cond: torch.Tensor
    """[1, id_dim] float: antelopev2 embedding (512) then the L2-normalised EVA embedding."""
    id_vit_hidden: tuple[torch.Tensor, ...]
    """One [1, tokens, vit_dim] float tensor per scale (5 in the real model)."""
    kps: torch.Tensor
    """[5, 2] float32: eyes, nose, mouth corners in pixels of the (resized) source photo."""
    face_image: torch.Tensor
    """[H, W, 3] uint8: the aligned, background-whitened face (the reference's first frame)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Free text: `source_image`, `face_models`, …"""

    def __post_init__(self) -> None:
        _check_shapes(self.id_cond, self.id_vit_hidden, self.kps, self.face_image, "this identity")

    @property
    def num_scales(self) -> int:
        return len(self.id_vit_hidden)

    def tensors(self) -> list[torch.Tensor]:
        """The identity as a flat list of tensors, to send to other processes (`--parallel`
        broadcasts the one rank 0 made); `from_tensors` makes it again."""
        return [self.id_cond, *self.id_vit_hidden, self.kps, self.face_image]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> Identity:
        """The identity `tensors()` made the list of (its metadata stays behind)."""
        return cls(tensors[0], tuple(tensors[1:-2]), tensors[-2], tensors[-1])

    def face_image_pil(self) -> Image.Image:
        return Image.fromarray(self.face_image.cpu().numpy())

    def check_compatible(self, transformer_config: Mapping, where: str = "the identity") -> None:
        """Raise IdentityError unless this identity fits a transformer of that config."""
        id_dim = transformer_config["LFE_id_dim"]
        vit_dim = transformer_config["LFE_vit_dim"]
        scales = transformer_config["LFE_num_scale"]
        found = (self.id_cond.shape[-1], self.num_scales, self.id_vit_hidden[0].shape[-1])
        if found != (id_dim, scales, vit_dim):
            raise IdentityError(
                f"{where} does not fit this checkpoint: it has id_cond of width {found[0]} and "
                f"{found[1]} hidden states of width {found[2]}, the checkpoint expects width {id_dim} "
                f"and {scales} of width {vit_dim}. Make the identity with this checkpoint's face models."
            )


def _check_shapes(id_cond, id_vit_hidden, kps, face_image, where: str) -> None:
    if id_cond.ndim != 2 or id_cond.shape[0] != 1 or not id_cond.is_floating_point():
        raise IdentityError(f"{where}: id_cond must be a float tensor [1, D], found {_describe(id_cond)}")
    if not id_vit_hidden:
        raise IdentityError(f"{where}: id_vit_hidden is empty; it needs one tensor per scale")
    first = id_vit_hidden[0]
    for i, hidden in enumerate(id_vit_hidden):
        if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape != first.shape or not hidden.is_floating_point():
            raise IdentityError(
                f"{where}: id_vit_hidden.{i} must be a float tensor [1, tokens, width] shaped like "
                f"id_vit_hidden.0 {tuple(first.shape)}, found {_describe(hidden)}"
            )
    if tuple(kps.shape) != (5, 2) or not kps.is_floating_point():
        raise IdentityError(f"{where}: kps must be a float tensor [5, 2] (five keypoints), found {_describe(kps)}")
    if face_image.ndim != 3 or face_image.shape[-1] != 3 or face_image.dtype != torch.uint8:
        raise IdentityError(f"{where}: face_image must be uint8 [H, W, 3], found {_describe(face_image)}")
    if not MIN_FACE_SIDE <= min(face_image.shape[:2]) <= max(face_image.shape[:2]) <= MAX_FACE_SIDE:
        raise IdentityError(
            f"{where}: face_image is {face_image.shape[1]}×{face_image.shape[0]}; it must be {MIN_FACE_SIDE} to "
            f"{MAX_FACE_SIDE} pixels a side (the face models make 512×512)"
        )
    if len(id_vit_hidden) > MAX_SCALES:
        raise IdentityError(f"{where}: {len(id_vit_hidden)} hidden states; ConsisID uses 5 (at most {MAX_SCALES})")
    named = [("id_cond", id_cond), ("kps", kps)] + [(f"id_vit_hidden.{i}", h) for i, h in enumerate(id_vit_hidden)]
    check_tensors(named, where, "make the identity again from a photo with the face models", IdentityError, MAX_VALUE)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def save_identity(identity: Identity, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `identity` to `path` (.safetensors) atomically: a failed write leaves nothing behind,
    and an existing file is never replaced unless `overwrite`."""
    path = Path(path)
    try:
        if not path.parent.is_dir():
            raise IdentityError(f"cannot write '{path}': its folder '{path.parent}' does not exist")
        if path.is_dir() or (path.exists() and not overwrite):
            raise IdentityError(f"'{path}' already exists; give a new file name")
    except OSError as e:  # a name too long for the file system, …
        raise IdentityError(f"cannot write '{path}': {e.strerror or e}") from None
    tensors = {"id_cond": identity.id_cond, "kps": identity.kps, "face_image": identity.face_image}
    tensors |= {f"id_vit_hidden.{i}": h for i, h in enumerate(identity.id_vit_hidden)}
    # copies: safetensors refuses tensors that share memory (one hidden state given for every scale)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {str(k): str(v) for k, v in identity.metadata.items()} | {"format": FORMAT, "version": VERSION}
    try:
        write_atomically(path, lambda staged: save_file(tensors, staged, metadata=metadata), overwrite)
    except ConsisIDError as e:
        raise IdentityError(str(e)) from None
    except (OSError, SafetensorError) as e:
        raise IdentityError(f"cannot write '{path}': {getattr(e, 'strerror', None) or e}") from None
    return path


def load_identity(path: str | os.PathLike) -> Identity:
    """Read an identity file written by `save_identity`; a wrong file gets an IdentityError."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"identity file '{path}' does not exist; make one with `python -m consisid_core embed`")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise IdentityError(
            f"'{path}' is {path.stat().st_size / 2**20:.0f} MB; an identity file is about 13 MB "
            f"(at most {MAX_FILE_BYTES // 2**20} MB): this is not one"
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            unknown = [k for k in names if not _KEY.fullmatch(k)]
            if unknown:
                raise IdentityError(
                    f"'{path}' is not a ConsisID identity file: unexpected tensor '{shown(unknown[0], 80)}' "
                    "(it holds id_cond, kps, face_image and id_vit_hidden.0, .1, …)"
                )
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if isinstance(e, IdentityError):
            raise
        raise IdentityError(f"'{path}' is not a readable .safetensors identity file ({e})") from None
    scales = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("id_vit_hidden."))
    missing = [k for k in ("id_cond", "kps", "face_image", "id_vit_hidden.0") if k not in tensors]
    missing += [f"id_vit_hidden.{i}" for i in range(len(scales)) if i not in scales]
    if missing:
        raise IdentityError(
            f"'{path}' is not a ConsisID identity file: missing {', '.join(missing)} "
            f"(found {', '.join(sorted(tensors)) or 'no tensors'})"
        )
    # half-precision or float64 files load as the float32 the face models make
    tensors = {k: v.float() if v.is_floating_point() and k != "face_image" else v for k, v in tensors.items()}
    hidden = tuple(tensors[f"id_vit_hidden.{i}"] for i in range(len(scales)))
    _check_shapes(tensors["id_cond"], hidden, tensors["kps"], tensors["face_image"], f"'{path}'")
    metadata.pop("format", None)
    metadata.pop("version", None)
    return Identity(tensors["id_cond"], hidden, tensors["kps"], tensors["face_image"], metadata)
