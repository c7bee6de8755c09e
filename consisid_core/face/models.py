"""Loading the face models of a ConsisID checkpoint's `face_encoder/` folder, without any download.

insightface's antelopev2 detector and recogniser (ONNX, run by ONNX Runtime, imported with its
telemetry off: `onnxruntime_offline`), facexlib's RetinaFace and BiSeNet, and EVA02-CLIP-L-14-336's
vision tower, each built directly from the folder's files where the reference's helpers would
download them. How and why: docs/dev/architecture.md, "The face models"."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import ANTELOPE_DIR, BISENET_FILE, DETECTION_FILE, EVA_FILE, RECOGNITION_FILE, RETINAFACE_FILE
from ..errors import FaceError, first_line
from .eva import EvaVisionTower, check_state_fits, load_eva_tower, load_face_weights

logger = logging.getLogger(__name__)

DET_SIZE = (640, 640)
"""insightface detector input size, as the reference prepares it."""
DET_THRESH = 0.5
RETINAFACE_THRESH = 0.97
"""facexlib FaceRestoreHelper's detection threshold."""
BISENET_CLASSES = 19
"""facexlib's face parser: background, skin, brows, eyes, …, hat (`extract.PARSING_BACKGROUND`)."""


@dataclass
class FaceModels:
    """Everything `extract_identity` needs; built by `load_face_models`. Treat as read-only."""

    detector: Any
    """insightface SCRFD (antelopev2 detection)."""
    recognizer: Any
    """insightface ArcFaceONNX (antelopev2 recognition, 512-d)."""
    retinaface: torch.nn.Module
    """facexlib RetinaFace (5-point landmarks used for the 512×512 alignment)."""
    parser: torch.nn.Module
    """facexlib BiSeNet (19 face-parsing classes)."""
    eva: EvaVisionTower
    device: torch.device
    dtype: torch.dtype
    providers: list[str]
    source: Path
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def id_dim(self) -> int:
        return self.recognizer_dim + self.eva.config.embed_dim

    @property
    def recognizer_dim(self) -> int:
        return int(self.recognizer.output_shape[-1])

    @property
    def vit_dim(self) -> int:
        return self.eva.config.width


def _install_commands() -> str:
    python = sys.executable or "python"
    pip = (f'"{python}"' if " " in python else python) + " -m pip"
    return (
        f"install one build of it into this Python: '{pip} install onnxruntime' (CPU), or "
        f"'{pip} install onnxruntime-gpu' for CUDA GPUs; only one, as they share the onnxruntime module"
    )


def onnxruntime_providers() -> list[str]:
    """The execution providers of the ONNX Runtime installed here, e.g. ['CUDAExecutionProvider',
    'CPUExecutionProvider']. ImportError naming the install command when there is none (or what is
    there is broken)."""
    try:
        onnxruntime = _onnxruntime()
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            raise ImportError(
                f"ConsisID's face models run on ONNX Runtime, which is not installed: {_install_commands()}"
            ) from None
        first = first_line(e)
        raise ImportError(f"ONNX Runtime is installed but does not import ({first}): {_install_commands()}") from e
    providers = getattr(onnxruntime, "get_available_providers", None)
    if providers is None:  # what uninstalling one build leaves of another installed over it
        raise ImportError(
            "ONNX Runtime's files here are incomplete (one build was installed over another, then one "
            f"uninstalled): uninstall onnxruntime and onnxruntime-gpu, then {_install_commands()}"
        )
    return list(providers())


TELEMETRY_OFF = "ORT_DISABLE_TELEMETRY"
"""ONNX Runtime reads this when it initializes (at its import): "1" keeps its telemetry off."""


_IMPORTED_OFFLINE: list = []
"""The onnxruntime module, when its first import came with its telemetry off."""


@contextlib.contextmanager
def onnxruntime_offline() -> Iterator[None]:
    """Inside, a first import of ONNX Runtime (the pack's, or the one diffusers makes when it saves
    a pipeline) keeps its telemetry off (see the module doc)."""
    first = "onnxruntime" not in sys.modules
    with _environment(TELEMETRY_OFF, "1"):
        yield
    if first and sys.modules.get("onnxruntime") is not None:
        _IMPORTED_OFFLINE.append(sys.modules["onnxruntime"])


@functools.cache
def _onnxruntime():
    """`import onnxruntime`, with its telemetry off when this is the first import; a warning, once,
    when another import came first with telemetry on."""
    with onnxruntime_offline():
        import onnxruntime
    if onnxruntime not in _IMPORTED_OFFLINE and os.environ.get(TELEMETRY_OFF) != "1":
        logger.warning(
            "ONNX Runtime was imported before ConsisID's face models, with its telemetry on (it sends usage events "
            "to Microsoft over the network); set %s=1 in the environment that starts this program to keep it offline",
            TELEMETRY_OFF,
        )
    return onnxruntime


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`os.environ[name]` is `value` inside the block, as it was after it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def resolve_providers(provider: str) -> list[str]:
    """'cpu', 'cuda' or any ONNX Runtime provider name → the provider list for a session (CPU last)."""
    available = onnxruntime_providers()
    wanted = str(provider).strip()
    key = wanted.lower().removesuffix("executionprovider")
    match = [p for p in available if p.lower().removesuffix("executionprovider") == key]
    if not match:
        short = ", ".join(p.removesuffix("ExecutionProvider").lower() for p in available)
        raise FaceError(
            f"ONNX Runtime provider '{provider}' is not available here; available: {short}. "
            + ("For CUDA uninstall onnxruntime, then install onnxruntime-gpu (in that order: they share one "
               "module). " if key == "cuda" else "")
            + "Pick one of the available ones (cpu always works)."
        )
    providers = [match[0]]
    if match[0] != "CPUExecutionProvider" and "CPUExecutionProvider" in available:
        providers.append("CPUExecutionProvider")
    return providers


def _require(path: Path, folder: Path, what: str) -> Path:
    if not path.is_file():
        raise FaceError(
            f"{what} '{path.name}' is missing: looked for {path} in the face encoder folder {folder}. "
            "Download the ConsisID checkpoint's face_encoder folder completely (nothing is downloaded "
            "automatically)."
        )
    return path


def facexlib_models() -> tuple[type, type]:
    """facexlib's RetinaFace and BiSeNet classes; without facexlib, an ImportError naming the install."""
    try:
        from facexlib.detection.retinaface import RetinaFace
        from facexlib.parsing.bisenet import BiSeNet
    except ImportError as e:
        raise ImportError("the ConsisID face pipeline needs facexlib: pip install facexlib") from e
    return RetinaFace, BiSeNet


def load_retinaface(path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """facexlib RetinaFace from our file; the backbone (resnet50 or mobile0.25) is read from the keys."""
    RetinaFace, _ = facexlib_models()
    path = Path(path)
    state = load_face_weights(path)
    if "body.conv1.weight" in state:
        network = "resnet50"
    elif "body.stage1.0.0.weight" in state:
        network = "mobile0.25"
    else:
        raise FaceError(
            f"'{path}' is not a facexlib RetinaFace checkpoint (no body.conv1 / body.stage1 weights); "
            "use detection_Resnet50_Final.pth from the ConsisID face_encoder folder"
        )
    model = RetinaFace(network_name=network, half=False, device=torch.device(device))
    check_state_fits(model, state, f"'{path}'", f"facexlib RetinaFace ({network})")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def load_bisenet(path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """facexlib BiSeNet (19 classes) from our file."""
    _, BiSeNet = facexlib_models()
    path = Path(path)
    state = load_face_weights(path)
    classes = state.get("conv_out.conv_out.weight")
    if classes is None:
        raise FaceError(f"'{path}' is not a facexlib BiSeNet checkpoint (no conv_out.conv_out.weight)")
    if classes.ndim != 4 or classes.shape[0] != BISENET_CLASSES:
        raise FaceError(
            f"'{path}' is not ConsisID's face parser: its conv_out.conv_out.weight is {list(classes.shape)}, a "
            f"parser of the {BISENET_CLASSES} face classes has [{BISENET_CLASSES}, 64, 1, 1]; use parsing_bisenet.pth "
            "from the ConsisID checkpoint's face_encoder folder"
        )
    model = BiSeNet(num_class=BISENET_CLASSES)
    check_state_fits(model, state, f"'{path}'", "facexlib BiSeNet")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def _load_insightface(path: Path, task: str, providers: list[str]):
    try:
        from insightface.model_zoo import model_zoo
    except ImportError as e:
        raise ImportError("the ConsisID face pipeline needs insightface: pip install insightface") from e
    try:
        model = model_zoo.get_model(str(path), providers=providers)  # an existing file: never downloads
    except Exception as e:  # noqa: BLE001 - onnx and ONNX Runtime raise their own kinds for a bad file
        first = first_line(e)
        raise FaceError(
            f"'{path}' is not a readable ONNX model ({first}); download the antelopev2 files again"
        ) from None
    if model is None or getattr(model, "taskname", None) != task:
        found = getattr(model, "taskname", "an unrecognised model")
        raise FaceError(f"'{path}' should be the antelopev2 {task} model, insightface reads it as {found}")
    return model


def load_face_models(
    face_encoder_dir: str | os.PathLike,
    provider: str = "cpu",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FaceModels:
    """Load all face models from a `face_encoder/` folder (see the module doc). Never downloads.

    `provider` runs the insightface ONNX models ('cpu', 'cuda' or an ONNX Runtime provider name);
    `device`/`dtype` hold the torch models (EVA in `dtype`; RetinaFace and BiSeNet stay float32 as
    in the reference).
    """
    folder = Path(face_encoder_dir)
    if not folder.is_dir():
        raise FaceError(
            f"face encoder folder '{folder}' does not exist; it is the face_encoder/ folder of a "
            "ConsisID checkpoint (e.g. BestWishYsh/ConsisID-preview)"
        )
    providers = resolve_providers(provider)
    device = torch.device(device)
    antelope = folder / ANTELOPE_DIR
    det_path = _require(antelope / DETECTION_FILE, folder, "the antelopev2 detector")
    rec_path = _require(antelope / RECOGNITION_FILE, folder, "the antelopev2 recogniser")
    retina_path = _require(folder / RETINAFACE_FILE, folder, "the facexlib RetinaFace detector")
    parse_path = _require(folder / BISENET_FILE, folder, "the facexlib BiSeNet face parser")
    eva_path = _require(folder / EVA_FILE, folder, "the EVA02-CLIP face encoder")

    detector = _load_insightface(det_path, "detection", providers)
    detector.prepare(0, input_size=DET_SIZE, det_thresh=DET_THRESH)
    recognizer = _load_insightface(rec_path, "recognition", providers)
    recognizer.prepare(0)
    models = FaceModels(
        detector=detector,
        recognizer=recognizer,
        retinaface=load_retinaface(retina_path, device),
        parser=load_bisenet(parse_path, device),
        eva=load_eva_tower(eva_path, device=device, dtype=dtype),
        device=device,
        dtype=dtype,
        providers=providers,
        source=folder,
    )
    models.metadata = {"face_models": str(folder), "id_dim": str(models.id_dim), "vit_dim": str(models.vit_dim)}
    logger.info(
        "loaded face models from %s (ONNX Runtime %s, torch %s %s): id_cond width %d, hidden width %d",
        folder, providers[0], device, dtype, models.id_dim, models.vit_dim,
    )
    return models
