"""LoRA: a LoRA file from models/loras on the model, at a strength, for the runs that use it."""

from __future__ import annotations

from ..consisid_core.checkpoint import ConsisIDModel
from ..consisid_core.lora import read_lora
from . import folders, managed
from .declared import CONSISID_MODEL, declared_error, lora_strength_input


class ConsisIDLoRA:
    DISPLAY_NAME = "ConsisID LoRA"
    DESCRIPTION = (
        "Adds a LoRA from models/loras to the model at a strength: a .safetensors in diffusers layout "
        "trained for ConsisID or CogVideoX-5B-I2V (ComfyUI's diffusion_model. keys too). Chain several to stack "
        "them. Only runs that use this output get it: the loader's model is unchanged for other branches."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "apply"
    RETURN_TYPES = (CONSISID_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA stacked on the ones it had; connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (CONSISID_MODEL, {"tooltip": "From ConsisID Model Loader, or another ConsisID LoRA."}),
                "lora_name": (folders.files("loras"), {"tooltip": "A LoRA .safetensors in models/loras."}),
                "strength": lora_strength_input("Scale of the LoRA's update, as diffusers' fuse_lora(lora_scale): "
                                                "1 as trained; the official ConsisID LoRAs are fused at 1 / rank; "
                                                "negative values push away from it."),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: str, strength: float):
        return declared_error(cls, lora_name=lora_name, strength=strength) or True

    def apply(self, model: ConsisIDModel, lora_name: str, strength: float) -> tuple[ConsisIDModel]:
        return (managed.with_lora(model, read_lora(folders.file_path("loras", lora_name)), strength),)


NODES = {"ConsisIDLoRA": ConsisIDLoRA}
