"""ConsisID Step Cache: the wrapper's TeaCache (ConsisID's own coefficients) as a patch on the native MODEL."""

from __future__ import annotations

from ..declared import declared_error, step_cache_input
from . import comfy_parts


class ConsisIDStepCache:
    DISPLAY_NAME = "ConsisID Step Cache"
    DESCRIPTION = (
        "TeaCache for the native ConsisID MODEL, as ConsisID Performance's step_cache on the wrapper: where the "
        "timestep embedding changed little since the last computed step (ConsisID's own TeaCache coefficients), "
        "the transformer's blocks are skipped and their last residual reused. Core's EasyCache is the generic "
        "kind. 0 turns it off."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the step cache for the runs that use it; the input MODEL is unchanged.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A native ConsisID MODEL (Native Model Loader, or Face Layers)."}),
                "threshold": step_cache_input(default=0.1),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, threshold: float):
        return declared_error(cls, threshold=threshold) or True

    def patch(self, model, threshold: float):
        comfy_parts.require()
        comfy_parts.require("native_step_cache", self.DISPLAY_NAME)
        return (comfy_parts.with_step_cache(model, threshold),)


NODES = {"ConsisIDStepCache": ConsisIDStepCache}
