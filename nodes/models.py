"""Model loader: a ConsisID checkpoint folder, or a single-file transformer with a single-file VAE."""

from __future__ import annotations

from ..consisid_core.checkpoint import DTYPES, Checkpoint, ConsisIDModel
from ..consisid_core.single_file import load_vae_file, model_from_files
from . import folders, managed
from .declared import CONSISID_MODEL, SINGLE_FILE, checkpoint_names, checkpoint_source, declared_error

FROM_CHECKPOINT = "(from checkpoint)"


class ConsisIDModelLoader:
    DISPLAY_NAME = "ConsisID Model Loader"
    DESCRIPTION = (
        "Loads the ConsisID transformer and VAE: a checkpoint folder from models/consisid (or a "
        "models/diffusers folder whose model_index.json names ConsisIDPipeline), or one transformer "
        ".safetensors from models/diffusion_models with a VAE from models/vae. Nothing is downloaded."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "load"
    RETURN_TYPES = (CONSISID_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Transformer, VAE and scheduler settings (and the folder's T5, loaded on demand).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    checkpoint_names(),
                    {"tooltip": "A ConsisID checkpoint folder (diffusers layout), or diffusion_models/<file> "
                                "for a single-file transformer with diffusers key names."},
                ),
                "vae": (
                    [FROM_CHECKPOINT] + folders.files("vae"),
                    {"default": FROM_CHECKPOINT,
                     "tooltip": "The CogVideoX VAE: the checkpoint folder's own, or a .safetensors from "
                                "models/vae (needed with a single-file transformer)."},
                ),
                "dtype": (
                    list(DTYPES),
                    {"default": "bf16", "tooltip": "Weights' precision. bf16 as the reference; fp32 for CPU."},
                ),
                "fp8_weights": (
                    "BOOLEAN",
                    {"default": False,
                     "tooltip": "Store the transformer's linear weights in fp8 (about half the memory of bf16), "
                                "computing in dtype. The face layers keep full precision."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str, vae: str):
        problem = declared_error(cls, model=model, vae=vae)
        if problem:
            return problem
        if model.startswith(SINGLE_FILE) and vae == FROM_CHECKPOINT:
            return (
                f"'{model}' is a single transformer file with no VAE of its own: "
                "pick the CogVideoX VAE .safetensors from models/vae"
            )
        return True

    def load(self, model: str, vae: str, dtype: str, fp8_weights: bool) -> tuple[ConsisIDModel]:
        source = checkpoint_source(model)
        if model.startswith(SINGLE_FILE):
            return (managed.managed(model_from_files(source, folders.file_path("vae", vae), dtype, fp8=fp8_weights)),)
        checkpoint = Checkpoint.open(source)
        own_vae = None if vae == FROM_CHECKPOINT else load_vae_file(folders.file_path("vae", vae), dtype)
        return (managed.managed(checkpoint.load_model(dtype, vae=own_vae, fp8=fp8_weights)),)


NODES = {"ConsisIDModelLoader": ConsisIDModelLoader}
