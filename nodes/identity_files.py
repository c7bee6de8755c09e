"""Identity files: save an identity to ComfyUI's output folder, load one from its input folder."""

from __future__ import annotations

from ..consisid_core.errors import ConsisIDError
from ..consisid_core.identity import load_identity, save_identity
from ..consisid_core.files import shown
from . import folders
from .declared import CONSISID_IDENTITY

SUFFIX = ".safetensors"


class ConsisIDSaveIdentity:
    DISPLAY_NAME = "ConsisID Save Identity"
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
                "identity": (CONSISID_IDENTITY, {"tooltip": "From ConsisID Face Embed."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "consisid/identity", "tooltip": "File name prefix, under the output folder."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str):
        try:
            folders.save_path_checked(filename_prefix)
        except ConsisIDError as e:
            return str(e)
        return True

    def save(self, identity, filename_prefix: str):
        try:
            path = save_identity(identity, folders.save_path(filename_prefix, SUFFIX))
        except OSError as e:  # a name too long for the file system, a read-only folder, a file where a folder goes
            raise ConsisIDError(
                f"cannot write an identity file for filename_prefix '{shown(filename_prefix)}' in the output "
                f"folder ({e.strerror or type(e).__name__}); choose a shorter prefix, or another folder"
            ) from None
        return {"ui": {"text": [str(path.name)]}, "result": ()}


class ConsisIDLoadIdentity:
    DISPLAY_NAME = "ConsisID Load Identity"
    DESCRIPTION = "Loads an identity .safetensors file (made by ConsisID Save Identity or the CLI's embed) from the input folder."
    CATEGORY = "ConsisID"
    FUNCTION = "load"
    RETURN_TYPES = (CONSISID_IDENTITY, "IMAGE")
    RETURN_NAMES = ("identity", "face")
    OUTPUT_TOOLTIPS = ("The identity.", "Its aligned face, the reference's first frame.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity_file": (
                    folders.input_files(SUFFIX),
                    {"tooltip": "An identity .safetensors in ComfyUI's input folder."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, identity_file: str):
        # only a listed file: the answer is the same for any other name, so it tells nothing of the disk
        if identity_file not in folders.input_files(SUFFIX):
            return (
                f"identity_file '{shown(identity_file)}' is not one of the identity files in the input folder; "
                "pick one from the list (refresh it after adding files)"
            )
        return True

    @classmethod
    def IS_CHANGED(cls, identity_file: str):
        try:
            path = folders.input_file(identity_file)
        except ConsisIDError:
            return ""
        return path.stat().st_mtime_ns if path.is_file() else ""

    def load(self, identity_file: str):
        identity = load_identity(folders.input_file(identity_file))
        return identity, (identity.face_image.float() / 255).unsqueeze(0)


NODES = {"ConsisIDSaveIdentity": ConsisIDSaveIdentity, "ConsisIDLoadIdentity": ConsisIDLoadIdentity}
