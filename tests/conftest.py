"""Shared fixtures: tiny checkpoints written by `make-tiny` into temporary folders."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from consisid_core.checkpoint import Checkpoint
from consisid_core.identity import save_identity
from consisid_core.text import MAX_SEQUENCE_LENGTH, TextEmbeddings
from consisid_core.tiny import make_tiny, random_identity


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_kps_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-kps", seed=1, kps=True)


@pytest.fixture(scope="session")
def native_tiny_dir(tmp_path_factory) -> Path:
    """`make-tiny --native`: the tiny checkpoint core ComfyUI's loaders take (the native path's)."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-native", seed=0, native=True)


@pytest.fixture(scope="session")
def native_vae_file(native_tiny_dir) -> Path:
    """The native tiny's VAE as one file: the released CogVideoX architecture (the one core's VAE
    Loader builds), random weights."""
    from native_tools import vae_file

    return vae_file(native_tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return Checkpoint.open(tiny_dir).load_model("fp32")


@pytest.fixture
def identity(tiny_model):
    return random_identity(tiny_model.config, seed=7)


@pytest.fixture
def identity_file(tiny_model, tmp_path) -> Path:
    """A random identity of the tiny model, saved as tmp_path/me.safetensors."""
    return save_identity(random_identity(tiny_model.config, seed=4), tmp_path / "me.safetensors")


@pytest.fixture
def photo(tmp_path) -> Path:
    """A real photo, tmp_path/astronaut.png: the tiny face models find faces wherever it is bright."""
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


@pytest.fixture
def text(tiny_model):
    g = torch.Generator().manual_seed(0)
    width = tiny_model.config.text_embed_dim
    return TextEmbeddings(
        torch.randn(1, MAX_SEQUENCE_LENGTH, width, generator=g), torch.randn(1, MAX_SEQUENCE_LENGTH, width, generator=g)
    )


@pytest.fixture
def counted_calls(monkeypatch):
    """A count of calls, by name, with `counted_calls.watch(owner, name)` counting each call of `owner.name`
    (left in place; undone after the test)."""
    import collections

    counts = collections.Counter()

    def watch(owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    counts.watch = watch
    return counts


@pytest.fixture
def home(tmp_path, tiny_dir, monkeypatch):
    """A ComfyUI-like base folder for the nodes outside ComfyUI, tmp_path/ComfyUI: models/consisid/tiny,
    models/diffusion_models, models/vae, input/, output/ (tmp_path around it, to see that nothing
    is written beside it)."""
    base = tmp_path / "ComfyUI"
    (base / "models" / "consisid").mkdir(parents=True)
    (base / "models" / "consisid" / "tiny").symlink_to(tiny_dir, target_is_directory=True)
    for kind, source in (("diffusion_models", "transformer"), ("vae", "vae")):
        (base / "models" / kind).mkdir()
        shutil.copy(tiny_dir / source / "diffusion_pytorch_model.safetensors", base / "models" / kind / "tiny.safetensors")
    (base / "input").mkdir()
    (base / "output").mkdir()
    monkeypatch.setenv("CONSISID_HOME", str(base))
    return base


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    """Logs every open for reading ('open' events: path, mode of open() or None, flags of os.open)."""
    if _OPENED is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    reads = ("r" in mode or "+" in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) != os.O_WRONLY
    if reads:
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


class Sentinels:
    """Files outside every folder the code may use, which must never be read.

    Two witnesses: Python's audit hook sees every `open` from Python code (json, PIL, torch.load),
    and the file's access time, set before its modification time so that the kernel (relatime)
    updates it on any read, also by Rust or C code (safetensors, ONNX Runtime)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[Path] = []

    def make(self, name: str, data: bytes = b"not for your eyes") -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stat = path.stat()
        os.utime(path, ns=(stat.st_mtime_ns - 10**12, stat.st_mtime_ns))
        self.paths.append(path)
        return path

    def read(self) -> list[str]:
        """The sentinels that were read (empty when none was)."""
        opened = set(_OPENED or [])
        seen = [str(p) for p in self.paths if os.path.realpath(p) in opened]
        seen += [str(p) for p in self.paths if _ATIME_WORKS and p.stat().st_atime_ns >= p.stat().st_mtime_ns]
        return sorted(set(seen))


def _atime_works(folder: Path) -> bool:
    probe = folder / "atime-probe"
    probe.write_bytes(b"x")
    stat = probe.stat()
    os.utime(probe, ns=(stat.st_mtime_ns - 10**12, stat.st_mtime_ns))
    probe.read_bytes()
    return probe.stat().st_atime_ns >= stat.st_mtime_ns


_ATIME_WORKS = False
sys.addaudithook(_audit)


@pytest.fixture
def sentinels(tmp_path_factory):
    """`sentinels.make(name, data)` makes a file that must not be read; the test fails if it was."""
    global _OPENED, _ATIME_WORKS
    folder = tmp_path_factory.mktemp("outside")
    _ATIME_WORKS = _atime_works(folder)
    _OPENED = []
    watch = Sentinels(folder)
    try:
        yield watch
        assert watch.read() == [], "a file outside the allowed folders was read"
    finally:
        _OPENED = None
