"""ComfyUI nodes: thin adapters over `consisid_core`, one file per concern.

`fence` and `native/comfy_parts` alone import ComfyUI; `folders`, `managed` and `progress` use it through
`fence` and fall back to plain behaviour outside it, so everything here imports and runs outside ComfyUI too.
Each node class carries its display name (`DISPLAY_NAME`); `declared` holds what the nodes declare in common.
"""

from . import faces, identity_files, long_video, lora, models, sampling, score, text, vae
from .native import nodes as native
from .native import long_video as native_long_video
from .native import seed, step_cache

NODE_CLASS_MAPPINGS = {}
for _module in (faces, identity_files, models, lora, text, sampling, vae, long_video, score, native, step_cache, seed, native_long_video):
    NODE_CLASS_MAPPINGS.update(_module.NODES)
NODE_DISPLAY_NAME_MAPPINGS = {node_id: node.DISPLAY_NAME for node_id, node in NODE_CLASS_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
