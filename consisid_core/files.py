"""Files named by a user: kept inside their folder, read safely, written whole and never over
another file unless asked.

- `inside(root, name)`: the path of `name` in `root`, refused when `name` is absolute, climbs out
  with `..`, or (for input and output folders) leads out through a link. The refusal reads the
  same whether or not anything exists at the named place, so it tells nothing about the disk.
- `file_stem`: a name a command puts in front of the files it writes (`export --name`), refused
  unless it is one plain file name; `output_folder`: an existing folder to write in, resolved once.
- `numbered_path`: the next `<prefix>_00001_<suffix>` name, one above the highest taken.
- `publish`: move a finished temporary file or folder into place; without `overwrite` an
  existing target is never replaced, even by a save racing this one. `write_all`: files written
  under hidden names beside their targets, then published together: all of them or, after a
  failure or a signal, none (`write_atomically`: one file).
- `safetensors_header`: a .safetensors file's shapes and metadata, no tensor read.
- `load_torch_weights`: `torch.load(weights_only=True)` with one line for every way a file can
  be wrong (pickled objects are refused without suggesting to load them anyway).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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


MAX_STEM = 100
"""Characters in a name put in front of written files: with the longest ending added
(`_transformer.safetensors`) it stays under every file system's limit."""
_NOT_IN_NAMES = frozenset('/\\:*?"<>|')
"""Path separators and what Windows refuses in file names."""


def file_stem(name, option: str) -> str:
    """`name` (the value of `option`) as the start of file names written in one folder: one plain
    file name, else a ConsisIDError naming it. No separator, nothing Windows refuses in a name, no
    control character, not `.`, `..` or hidden (a leading dot), at most `MAX_STEM` characters."""
    text = name if isinstance(name, str) else ""
    plain = (
        text.strip() == text != "" and len(text) <= MAX_STEM and not text.startswith(".") and not text.endswith(".")
        and all(c.isprintable() and c not in _NOT_IN_NAMES for c in text)
    )
    if not plain:
        raise ConsisIDError(
            f"{option} '{shown(name)}' is not a plain file name: give a name of up to {MAX_STEM} characters without "
            "a path (no / or \\), control characters, : * ? \" < > | or a leading or trailing dot, e.g. consisid"
        )
    return text


def output_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """The existing folder `folder` (the value of `option`), resolved once, for files written in it:
    refused in one line when it is missing, not a folder, or a link (to another folder)."""
    path = Path(folder)
    try:
        if path.is_symlink():
            raise ConsisIDError(
                f"{option} '{shown(path)}' is a symbolic link (to '{shown(os.readlink(path))}'); give the folder itself"
            )
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise ConsisIDError(f"{option} '{shown(path)}' {what}; give an existing folder to write the files in")
        return path.resolve(strict=True)
    except OSError as e:  # a name the file system refuses, a folder that cannot be searched
        said = e.strerror or e
        raise ConsisIDError(f"{option} '{shown(path)}' cannot be used ({said}); give another folder") from None


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """`write(path)` a file under a hidden name beside `target`, then `publish` it: `target` appears
    whole or not at all, and the hidden file is gone either way (`write_all` of one file)."""
    return write_all({Path(target): write}, overwrite)[0]


def write_all(writes: Mapping[Path, Callable[[Path], None]], overwrite: bool = False) -> list[Path]:
    """Each `write(path)` of `writes` into a hidden folder beside its target, then all published
    together: every target appears whole, or (after a failure, Ctrl-C or SIGTERM at any point) none
    does and a file `overwrite` would replace is as it was. No hidden file is left either way.

    In the main thread each write runs in a worker while the main thread waits, so that a signal
    stops the command at once even inside a long native call (writing gigabytes): the hidden folder
    goes at once, and with it the file the worker still fills."""
    staging: dict[Path, Path] = {}  # each target's folder -> its hidden staging folder
    try:
        for target, write in writes.items():
            if target.parent not in staging:
                staging[target.parent] = target.parent / f".{target.name[:32]}.{secrets.token_hex(6)}.partial"
                staging[target.parent].mkdir()
            _interruptibly(write, staging[target.parent] / target.name)
        _publish_all({target: staging[target.parent] / target.name for target in writes}, overwrite)
    finally:
        for folder in staging.values():
            _remove_staging(folder)
    return list(writes)


def _remove_staging(folder: Path) -> None:
    """Remove a staging folder, renamed first: a worker still writing cannot create anything in it."""
    gone = folder.with_name(folder.name.removesuffix(".partial") + ".gone")
    try:
        os.rename(folder, gone)
    except FileNotFoundError:
        return
    _remove_tree(gone)


def join_interruptibly(thread: threading.Thread, seconds: float | None = None) -> None:
    """Wait for `thread` to end (at most `seconds`) in short waits, so that a signal runs its
    handler (Ctrl-C, SIGTERM) within a fraction of a second: one long wait keeps a signal that came
    just before it slept, or to another thread, until the wait ends."""
    end = None if seconds is None else time.monotonic() + seconds
    while thread.is_alive() and (end is None or time.monotonic() < end):
        thread.join(0.1)


def _interruptibly(write: Callable[[Path], None], path: Path) -> None:
    """`write(path)`, in a worker thread when called from the main thread (where signals arrive),
    whose wait a signal ends at once."""
    if threading.current_thread() is not threading.main_thread():
        write(path)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            write(path)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=run, name=f"write {path.name}", daemon=True)
    worker.start()
    join_interruptibly(worker)
    if failed:
        raise failed[0]


def _publish_all(staged: Mapping[Path, Path], overwrite: bool) -> None:
    """`publish` every staged file (target -> staged path), SIGINT and SIGTERM held meanwhile: on any
    failure, or a signal held, the targets published are taken back (a replaced file restored)."""
    ours = {target: _file_id(path) for target, path in staged.items()}
    kept: dict[Path, Path] = {}  # the files --overwrite replaces, kept until all are published
    with _signals_held() as held:
        try:
            for target, path in staged.items():
                if overwrite and target.is_file() and not target.is_symlink():
                    kept[target] = target.with_name(f".{target.name[:32]}.{secrets.token_hex(6)}.old")
                    _keep(target, kept[target])
                publish(path, target, overwrite)
            if held:
                raise ConsisIDError("stopped by a signal while the files were moved into place; nothing was written")
        except BaseException:
            for target in staged:
                with contextlib.suppress(OSError):
                    _take_back(target, ours[target], kept.get(target))
            raise
        finally:
            for old in kept.values():
                old.unlink(missing_ok=True)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat(follow_symlinks=False)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _keep(target: Path, old: Path) -> None:
    """A second name for the file at `target` (moved there where hard links are not supported)."""
    try:
        os.link(target, old)
    except OSError:
        os.replace(target, old)


def _take_back(target: Path, ours: tuple[int, int] | None, old: Path | None) -> None:
    """Undo the publishing of `target`: remove the file placed there (`ours`), restore `old`."""
    placed = _file_id(target) == ours
    if old is not None and old.exists() and (placed or _file_id(target) is None):
        os.replace(old, target)
    elif placed:
        target.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM that arrive in the block are noted (the list) and delivered when it ends,
    to the handlers there were: the few quick steps inside run whole. Only the main thread has
    signal handlers; elsewhere nothing changes."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler not in (signal.SIG_IGN, None):
            previous[number] = signal.signal(number, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in held:
            signal.raise_signal(number)


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
