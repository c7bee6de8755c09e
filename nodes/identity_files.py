"""Identity files: save an identity to ComfyUI's output folder, load one from its input folder."""

from __future__ import annotations

from ..consisid_core.identity import load_identity, save_identity
from . import host

SUFFIX = ".safetensors"


def _identity_files() -> list[str]:
    root = host.input_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{SUFFIX}") if p.is_file())


class ConsisIDSaveIdentity:
    DESCRIPTION = (
        "Saves an identity as .safetensors in the output folder, to reuse it later (copy it to the "
        "input folder and use ConsisID Load Identity) without the face models in memory."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity": ("CONSISID_IDENTITY", {"tooltip": "From ConsisID Face Embed."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "consisid/identity", "tooltip": "File name prefix, under the output folder."},
                ),
            }
        }

    def save(self, identity, filename_prefix: str):
        path = save_identity(identity, host.save_path(filename_prefix, SUFFIX))
        return {"ui": {"text": [str(path.name)]}, "result": ()}


class ConsisIDLoadIdentity:
    DESCRIPTION = "Loads an identity .safetensors file (made by ConsisID Save Identity or the CLI's embed) from the input folder."
    CATEGORY = "ConsisID"
    FUNCTION = "load"
    RETURN_TYPES = ("CONSISID_IDENTITY", "IMAGE")
    RETURN_NAMES = ("identity", "face")
    OUTPUT_TOOLTIPS = ("The identity.", "Its aligned face, the reference's first frame.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity_file": (
                    _identity_files(),
                    {"tooltip": "An identity .safetensors in ComfyUI's input folder."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, identity_file: str):
        if not (host.input_dir() / identity_file).is_file():
            return f"identity file '{identity_file}' is not in the input folder {host.input_dir()}"
        return True

    @classmethod
    def IS_CHANGED(cls, identity_file: str):
        path = host.input_dir() / identity_file
        return path.stat().st_mtime_ns if path.is_file() else ""

    def load(self, identity_file: str):
        identity = load_identity(host.input_dir() / identity_file)
        return identity, (identity.face_image.float() / 255).unsqueeze(0)


NODES = {"ConsisIDSaveIdentity": ConsisIDSaveIdentity, "ConsisIDLoadIdentity": ConsisIDLoadIdentity}
NAMES = {"ConsisIDSaveIdentity": "ConsisID Save Identity", "ConsisIDLoadIdentity": "ConsisID Load Identity"}
