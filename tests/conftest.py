"""Shared fixtures: tiny checkpoints written by `make-tiny` into temporary folders."""

from pathlib import Path

import pytest

from consisid_core.checkpoint import Checkpoint
from consisid_core.tiny import make_tiny, random_identity


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_kps_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-kps", seed=1, kps=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return Checkpoint.open(tiny_dir).load_model("fp32")


@pytest.fixture
def identity(tiny_model):
    return random_identity(tiny_model.config, seed=7)
