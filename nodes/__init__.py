"""ComfyUI nodes: thin adapters over `consisid_core`, one file per concern.

`host` alone touches ComfyUI; everything here imports and runs outside ComfyUI too.
"""

from . import faces, identity_files, models, sampling, text, vae

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (faces, identity_files, models, text, sampling, vae):
    NODE_CLASS_MAPPINGS.update(_module.NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NAMES)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
