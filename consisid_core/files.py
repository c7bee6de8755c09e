"""Files named by a user: kept inside their folder, read safely, written whole and never over
another file unless asked.

- `inside(root, name)`: the path of `name` in `root`, refused when `name` is absolute, climbs out
  with `..`, or (for input and output folders) leads out through a link. The refusal reads the
  same whether or not anything exists at the named place, so it tells nothing about the disk.
- `numbered_path`: the next `<prefix>_00001_<suffix>` name, one above the highest taken.
- `publish`: move a finished temporary file or folder into place; without `overwrite` an
  existing target is never replaced, even by a save racing this one. `write_atomically`: a file
  written under a hidden name beside its target, then published.
- `safetensors_header`: a .safetensors file's shapes and metadata, no tensor read.
- `load_torch_weights`: `torch.load(weights_only=True)` with one line for every way a file can
  be wrong (pickled objects are refused without suggesting to load them anyway).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import safe_open

from .errors import ConsisIDError, first_line


def inside(root: str | os.PathLike, name: str, folder: str, follow_links: bool = False) -> Path:
    """`root / name`, with `name` a relative path that stays inside `root`.

    `folder` names the folder in messages ("input", "output", "models/vae"). With
    `follow_links` (model folders, where people link big files in) links are followed as
    ComfyUI follows them; otherwise the resolved path must stay inside the resolved root too.
    """
    refused = ConsisIDError(
        f"'{shown(name)}' is not a file name inside the {folder} folder: give a name relative to that folder, "
        "without '..' or a leading '/', as its file list shows it"
    )
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise refused
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.anchor or ".." in pure.parts:
            raise refused
    root = Path(root)
    path = root / name
    if not follow_links:
        real_root = root.resolve()
        if not path.resolve().is_relative_to(real_root):
            raise ConsisIDError(
                f"'{shown(name)}' leads outside the {folder} folder through a link; only files inside it are used"
            )
    return path


def shown(value, limit: int = 120) -> str:
    """A name as a message shows it: on one line (control characters such as a newline or NUL
    written as escapes) and cut after `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    return text if len(text) <= limit else text[:limit] + "…"


def numbered_path(folder: str | os.PathLike, prefix: str, suffix: str) -> Path:
    """`folder/<prefix>_<n:05>_<suffix>` with n one above the highest number taken (ComfyUI's
    naming), so that deleting a file never makes the next save reuse another's name."""
    folder = Path(folder)
    pattern = re.compile(re.escape(prefix) + r"_([0-9]+)_" + re.escape(suffix))
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))] if folder.is_dir() else []
    return folder / f"{prefix}_{max(taken, default=0) + 1:05}_{suffix}"


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """`write(path)` a file under a hidden name beside `target`, then `publish` it: `target` appears
    whole or not at all, and the hidden file is gone either way."""
    # the temporary name is kept short: the target's name may be as long as the file system allows
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name[:32]}.", suffix=".partial", dir=target.parent)
    os.close(descriptor)
    staged = Path(name)
    try:
        write(staged)
        return publish(staged, target, overwrite)
    finally:
        staged.unlink(missing_ok=True)


def publish(staged: Path, target: Path, overwrite: bool = False) -> Path:
    """Move the finished `staged` file or folder to `target`.

    Without `overwrite`, an existing `target` (but an empty folder) is never replaced: a file is
    linked into place, which fails if the name was taken meanwhile. With it, a file replaces the
    old one atomically and a folder replaces the old folder.
    """
    if staged.is_dir():
        if target.is_dir() and any(target.iterdir()):
            if not overwrite:
                raise ConsisIDError(f"'{target}' already exists and is not empty; nothing was replaced")
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(staged, target)
            _remove_tree(old)
            return target
        if target.is_dir():
            target.rmdir()
        elif target.exists() or target.is_symlink():
            raise ConsisIDError(f"'{target}' already exists and is not a folder; nothing was replaced")
        os.replace(staged, target)
        return target
    if overwrite:
        os.replace(staged, target)
        return target
    try:
        os.link(staged, target)
    except FileExistsError:
        raise ConsisIDError(f"'{target}' already exists; nothing was replaced") from None
    except OSError:  # a file system without hard links: the check and the move are not one step
        if target.exists() or target.is_symlink():
            raise ConsisIDError(f"'{target}' already exists; nothing was replaced") from None
        os.replace(staged, target)
        return target
    staged.unlink()
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_torch_weights(path: str | os.PathLike, error=ConsisIDError) -> dict:
    """A state dict from a PyTorch file, read with `weights_only=True` (no code in it can run).

    Any file that is not a plain weights file gets one line: `error(...)`.
    """
    path = Path(path)
    damaged = f"'{path}' is not a readable PyTorch weights file, damaged or truncated"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e).lower()
        if "weights only" in text and "unsupported operand" not in text:  # an object, not random bytes
            raise error(
                f"'{path}' is not a plain weights file: it holds pickled Python objects, which are never loaded "
                "(they could run code); use the original file from the ConsisID checkpoint"
            ) from None
        raise error(f"{damaged} (unreadable pickle data); download it again") from None
    except Exception as e:  # noqa: BLE001 - damaged bytes fail in many ways there (IndexError, KeyError, …)
        first = re.split(r"(?<=\.)\s", first_line(e))[0]  # its first sentence
        raise error(f"{damaged} ({first}); download it again") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise error(f"'{path}' does not hold a state dict (found {type(state).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and the metadata of a .safetensors file, from its header alone (no tensor is
    read). safetensors' `SafetensorError` and `OSError` reach the caller, which names the file."""
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
