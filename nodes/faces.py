"""Face nodes: load the face models, turn photos into identities."""

from __future__ import annotations

import logging

import torch

from ..consisid_core.errors import FaceError
from ..consisid_core.face import extract_identity, load_face_models, onnxruntime_providers
from ..consisid_core.files import shown
from . import fence, folders, managed, progress
from .declared import CONSISID_FACE_MODELS, CONSISID_IDENTITY, image_batch

logger = logging.getLogger(__name__)


def _providers() -> list[str]:
    """ONNX Runtime's providers here, cpu first (just cpu without ONNX Runtime: the nodes still
    load, and loading the face models says what to install)."""
    try:
        names = [p.removesuffix("ExecutionProvider").lower() for p in onnxruntime_providers()]
    except ImportError:
        return ["cpu"]
    return ["cpu"] + [n for n in names if n != "cpu"]


class ConsisIDFaceModelsLoader:
    DISPLAY_NAME = "ConsisID Face Models Loader"
    DESCRIPTION = (
        "Loads ConsisID's face models (insightface antelopev2, facexlib RetinaFace and BiSeNet, "
        "EVA02-CLIP-L) from a checkpoint's face_encoder folder in models/consisid. Nothing is downloaded."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "load"
    RETURN_TYPES = (CONSISID_FACE_MODELS,)
    RETURN_NAMES = ("face_models",)
    OUTPUT_TOOLTIPS = ("The face models, for ConsisID Face Embed.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_encoder": (
                    sorted(folders.face_encoder_folders()),
                    {"tooltip": "A checkpoint in models/consisid (its face_encoder/ folder is used), "
                                "or a standalone face_encoder folder there."},
                ),
                "provider": (
                    _providers(),
                    {"default": "cpu", "tooltip": "ONNX Runtime provider for the insightface models. "
                                                  "'cuda' needs onnxruntime-gpu (instead of onnxruntime)."},
                ),
                "device": (
                    ["cpu", "gpu"],
                    {"default": "cpu", "tooltip": "Where the torch face models (EVA, RetinaFace, BiSeNet) live. "
                                                  "cpu keeps the GPU free for sampling; gpu is faster."},
                ),
            }
        }

    def load(self, face_encoder: str, provider: str, device: str):
        encoders = folders.face_encoder_folders()
        if face_encoder not in encoders:
            raise FileNotFoundError(
                f"face encoder '{shown(face_encoder)}' is not in models/consisid; put the ConsisID checkpoint "
                "(with its face_encoder/ folder) there and refresh"
            )
        target = managed.torch_device() if device == "gpu" else torch.device("cpu")
        # inside ComfyUI the torch parts wait in RAM; ComfyUI moves them to `target` for each embed
        models = load_face_models(encoders[face_encoder], provider=provider, device="cpu" if fence.IN_COMFYUI else target)
        return (managed.managed_faces(models, target),)


class ConsisIDFaceEmbed:
    DISPLAY_NAME = "ConsisID Face Embed"
    DESCRIPTION = (
        "Finds the face in each image and makes its ConsisID identity, as the reference does: the "
        "largest face by default. Also gives the aligned face (the reference's first frame) and its mask."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "embed"
    RETURN_TYPES = (CONSISID_IDENTITY, "IMAGE", "MASK")
    RETURN_NAMES = ("identity", "face", "face_mask")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = (
        "One identity per input image (a list: nodes after it run once per identity).",
        "The aligned, background-whitened faces, 512x512: the reference uses this as the first frame.",
        "The parsed face on the aligned crop (1 = face).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Photos of the person; a batch gives one identity per image."}),
                "face_models": (CONSISID_FACE_MODELS, {"tooltip": "From ConsisID Face Models Loader."}),
                "face_index": (
                    "INT",
                    {"default": -1, "min": -1, "max": 63,
                     "tooltip": "-1: the largest face. 0, 1, …: that face counted from the left."},
                ),
            }
        }

    def embed(self, image: torch.Tensor, face_models, face_index: int):
        image = image_batch(image, "image input", "a photo (Load Image)", FaceError)
        owner = managed.owner(face_models)
        if owner is not None:
            managed.load([("face", owner.parts)], owner, load_device=face_models.device)
        identities, faces, masks = [], [], []
        for i, frame in enumerate(image):
            progress.check_interrupted()
            name = f"image {i + 1} of {len(image)}" if len(image) > 1 else "the input image"
            result = extract_identity(face_models, frame, None if face_index < 0 else face_index, name)
            identities.append(result.identity)
            faces.append(result.identity.face_image.float() / 255)
            masks.append(result.mask.float())
        return identities, torch.stack(faces), torch.stack(masks)


NODES = {"ConsisIDFaceModelsLoader": ConsisIDFaceModelsLoader, "ConsisIDFaceEmbed": ConsisIDFaceEmbed}
