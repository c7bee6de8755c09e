"""The face pipeline: load a checkpoint's face models, turn a photo into an `Identity`.

Heavy dependencies (insightface, onnxruntime, facexlib, timm, cv2) are imported by the functions that
need them, so importing this package is cheap.
"""

from .extract import FaceResult, extract_identities, extract_identity, to_rgb_uint8
from .models import FaceModels, load_face_models, onnxruntime_offline, onnxruntime_providers, resolve_providers
from .tiny import TINY_EVA, write_tiny_face_encoder

__all__ = [
    "FaceModels",
    "FaceResult",
    "TINY_EVA",
    "extract_identities",
    "extract_identity",
    "load_face_models",
    "onnxruntime_offline",
    "onnxruntime_providers",
    "resolve_providers",
    "to_rgb_uint8",
    "write_tiny_face_encoder",
]
