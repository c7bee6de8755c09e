"""The model folders and files, and the input and output folders, as ComfyUI's `folder_paths` keeps
them: `models/consisid` joins ComfyUI's model folders; a name is always resolved inside its folder.
Outside ComfyUI the folders are `$CONSISID_HOME/models/<kind>`, `$CONSISID_HOME/input` and
`$CONSISID_HOME/output`. ComfyUI's internals are reached through `fence`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..consisid_core.checkpoint import ANTELOPE_DIR, FACE_ENCODER
from ..consisid_core.errors import ConsisIDError
from ..consisid_core.files import inside, numbered_path, shown
from . import fence
from .fence import IN_COMFYUI, folder_paths

CONSISID_FOLDER = "consisid"
"""Our model folder: `models/consisid/<checkpoint>/` (diffusers layout, face_encoder/ inside)."""


def register_folders() -> None:
    """Check this ComfyUI's internals (`fence`: one log line each that differs) and add
    `models/consisid` to its model folders (called once, by the pack's __init__)."""
    if not fence.works("folders"):
        return
    folder_paths.add_model_folder_path(CONSISID_FOLDER, os.path.join(folder_paths.models_dir, CONSISID_FOLDER))


def _home() -> Path:
    return Path(os.environ.get("CONSISID_HOME", "."))


def folders(kind: str) -> list[Path]:
    """The folders of one model kind: consisid, diffusers, diffusion_models, vae."""
    if IN_COMFYUI:
        fence.require("folders", "the model folders")
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    return [_home() / "models" / kind]


def files(kind: str, suffixes: Iterable[str] = (".safetensors",)) -> list[str]:
    """Weight files of a kind, as names relative to their folder (ComfyUI's list, if there)."""
    suffixes = tuple(suffixes)
    if IN_COMFYUI:
        fence.require("folders", "the model folders")
        try:
            names = folder_paths.get_filename_list(kind)
        except KeyError:
            return []
    else:
        names = sorted(
            str(p.relative_to(root)) for root in folders(kind) if root.is_dir() for p in root.rglob("*") if p.is_file()
        )
    return [n for n in names if n.endswith(suffixes)]


def file_path(kind: str, name: str) -> Path:
    """The full path of a file named relative to a model folder (never outside it); a missing one
    gets an error naming the folder kind."""
    for root in folders(kind):
        path = inside(root, name, f"models/{kind}", follow_links=True)
        if path.is_file():
            return path
    raise FileNotFoundError(f"'{shown(name)}' is not in the {kind} model folders; put it there and refresh the list")


def pipeline_folders() -> dict[str, Path]:
    """ConsisID checkpoint folders by display name: `models/consisid/X` as `X`, and the
    `models/diffusers/X` whose model_index.json names ConsisIDPipeline as `diffusers/X`."""
    found: dict[str, Path] = {}
    for kind, prefix in ((CONSISID_FOLDER, ""), ("diffusers", "diffusers/")):
        for root in folders(kind):
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if (p / "model_index.json").is_file()):
                if kind == "diffusers" and not _names_consisid(folder / "model_index.json"):
                    continue
                found.setdefault(prefix + folder.name, folder)
    return found


def face_encoder_folders() -> dict[str, Path]:
    """Folders holding the face models: each checkpoint's face_encoder/, and standalone ones in
    `models/consisid/` (a folder with models/antelopev2/ inside)."""
    found = {name: path / FACE_ENCODER for name, path in pipeline_folders().items() if (path / FACE_ENCODER).is_dir()}
    for root in folders(CONSISID_FOLDER):
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if (p / ANTELOPE_DIR).is_dir()):
                found.setdefault(folder.name, folder)
    return found


def _names_consisid(index: Path) -> bool:
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "ConsisIDPipeline"
    except (OSError, ValueError):
        return False


def input_dir() -> Path:
    if IN_COMFYUI:
        fence.require("folders", "the input folder")
        return Path(folder_paths.get_input_directory())
    return _home() / "input"


def output_dir() -> Path:
    if IN_COMFYUI:
        fence.require("folders", "the output folder")
        return Path(folder_paths.get_output_directory())
    return _home() / "output"


def input_file(name: str) -> Path:
    """A file named relative to the input folder, refused if the name leads outside it."""
    return inside(input_dir(), name, "input")


def input_files(suffix: str) -> list[str]:
    """Files with `suffix` in the input folder (and its subfolders), as names relative to it."""
    root = input_dir()
    if not root.is_dir():
        return []
    names = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob(f"*{suffix}") if p.is_file())
    return [n for n in names if _stays_inside(root, n)]


def _stays_inside(root: Path, name: str) -> bool:
    try:
        inside(root, name, "input")
    except ValueError:
        return False
    return True


def save_path_checked(prefix: str) -> Path:
    """The output folder, once `prefix` is known to stay inside it (ComfyUI's %date% fields too)
    and to end in a file name."""
    out = output_dir()
    if inside(out, prefix.replace("%", ""), "output") == out:  # '.' or './': the folder itself
        raise ConsisIDError(
            f"filename_prefix '{shown(prefix)}' names the output folder, not a file: end it with a name, "
            "e.g. consisid/identity"
        )
    return out


def save_path(prefix: str, extension: str) -> Path:
    """A new file `<prefix>_<n:05>_<extension>` in the output folder, n one above the highest taken
    (ComfyUI's naming); a prefix that leads outside the output folder is refused."""
    out = save_path_checked(prefix)
    if IN_COMFYUI:
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(out))
        return Path(folder) / f"{name}_{counter:05}_{extension}"
    target = inside(out, prefix, "output")
    target.parent.mkdir(parents=True, exist_ok=True)
    return numbered_path(target.parent, target.name, extension)
