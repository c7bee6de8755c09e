"""Shared by the nodes' tests: one-line messages, identity files in bytes, the model parts that
ran (`parts_called`; the fixtures `model` and `calls`, imported into a test file)."""

from __future__ import annotations

import contextlib
import os

import pytest

from consisid_core.identity import save_identity


def one_line(message) -> str:
    """A message as ComfyUI shows it: text, on one line, no control characters, no traceback."""
    assert isinstance(message, str) and message.strip(), message
    assert all(c.isprintable() for c in message), repr(message)
    assert "Traceback" not in message
    return message


def identity_bytes(tmp_path, identity) -> bytes:
    made = tmp_path / "made"
    made.mkdir(exist_ok=True)
    path = save_identity(identity, made / f"{len(list(made.iterdir()))}.safetensors")
    return path.read_bytes()


@contextlib.contextmanager
def parts_called(model):
    """The names of the model's parts run meanwhile: transformer, VAE encoder and decoder (their
    forward pre-hooks), to see that a refusal comes before any of them."""
    seen: list[str] = []
    parts = {"transformer": model.transformer, "vae encoder": model.vae.encoder, "vae decoder": model.vae.decoder}
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: seen.append(n)) for name, m in parts.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def model(tiny_model):
    """The tiny model (conftest's), as the nodes' tests name it."""
    return tiny_model


@pytest.fixture
def calls(model):
    """`parts_called` for the length of a test."""
    with parts_called(model) as seen:
        yield seen


NEEDS_COMFYUI = pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")
"""For a test (marked `comfyui`) that imports the ComfyUI in COMFYUI_DIR in-process (`native_tools.import_comfyui`)."""
