"""ConsisID for ComfyUI: identity-preserving text-to-video nodes over the `consisid_core` library.

Outside ComfyUI (tests, the command line) this package registers nothing; `consisid_core` is a
plain library and `nodes` import without ComfyUI too.
"""

try:
    import comfy.utils  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.folders import register_folders
    from .nodes.renamed import register as register_renamed

    register_folders()
    register_renamed()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
