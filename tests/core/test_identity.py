"""The identity file: round trip, and the errors a wrong file gets."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from consisid_core.errors import IdentityError
from consisid_core.identity import Identity, load_identity, save_identity
from consisid_core.tiny import random_identity

CONFIG = {"LFE_id_dim": 1280, "LFE_vit_dim": 1024, "LFE_num_scale": 5}


@pytest.fixture
def real_sized():
    return random_identity(CONFIG, seed=3, face_size=512)


def test_tensors_round_trip_for_other_processes(real_sized):
    """What --parallel broadcasts from rank 0: a flat list of tensors, the same identity again."""
    tensors = real_sized.tensors()
    assert len(tensors) == 1 + 5 + 2 and all(isinstance(t, torch.Tensor) for t in tensors)
    back = Identity.from_tensors([t.clone() for t in tensors])
    assert torch.equal(back.id_cond, real_sized.id_cond) and torch.equal(back.kps, real_sized.kps)
    assert back.num_scales == 5
    assert all(torch.equal(a, b) for a, b in zip(back.id_vit_hidden, real_sized.id_vit_hidden))
    assert torch.equal(back.face_image, real_sized.face_image)


def test_round_trip_keeps_every_tensor_and_the_metadata(real_sized, tmp_path):
    path = save_identity(real_sized, tmp_path / "me.safetensors")
    keys = set(load_file(path))
    assert keys == {"id_cond", "kps", "face_image"} | {f"id_vit_hidden.{i}" for i in range(5)}
    back = load_identity(path)
    assert back.id_cond.shape == (1, 1280)
    assert [tuple(h.shape) for h in back.id_vit_hidden] == [(1, 577, 1024)] * 5
    assert back.face_image.dtype == torch.uint8 and back.face_image.shape == (512, 512, 3)
    assert torch.equal(back.id_cond, real_sized.id_cond)
    assert all(torch.equal(a, b) for a, b in zip(back.id_vit_hidden, real_sized.id_vit_hidden))
    assert torch.equal(back.kps, real_sized.kps)
    assert torch.equal(back.face_image, real_sized.face_image)
    assert back.metadata == dict(real_sized.metadata)
    assert list(tmp_path.iterdir()) == [path]


def test_missing_file(tmp_path):
    with pytest.raises(IdentityError, match="does not exist; make one with `python -m consisid_core embed`"):
        load_identity(tmp_path / "none.safetensors")


def test_not_safetensors(tmp_path):
    path = tmp_path / "photo.safetensors"
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(IdentityError, match="is not a readable .safetensors identity file"):
        load_identity(path)


def test_missing_keys(real_sized, tmp_path):
    path = save_identity(real_sized, tmp_path / "me.safetensors")
    tensors = load_file(path)
    del tensors["kps"], tensors["id_vit_hidden.2"]
    save_file(tensors, path)
    with pytest.raises(IdentityError, match="missing kps, id_vit_hidden.2"):
        load_identity(path)


def test_wrong_shapes(real_sized, tmp_path):
    path = save_identity(real_sized, tmp_path / "me.safetensors")
    tensors = load_file(path)
    tensors["id_vit_hidden.3"] = torch.zeros(1, 10, 1024)
    save_file(tensors, path)
    with pytest.raises(IdentityError, match=r"id_vit_hidden.3 must be .* \(1, 577, 1024\), found float32 \[1, 10, 1024\]"):
        load_identity(path)


def test_face_image_must_be_uint8(real_sized):
    with pytest.raises(IdentityError, match=r"face_image must be uint8 \[H, W, 3\], found float32"):
        Identity(real_sized.id_cond, real_sized.id_vit_hidden, real_sized.kps, real_sized.face_image.float())


def test_does_not_fit_another_checkpoint(real_sized):
    with pytest.raises(IdentityError, match="width 1280 and 5 hidden states of width 1024, the checkpoint expects width 544"):
        real_sized.check_compatible({"LFE_id_dim": 544, "LFE_vit_dim": 32, "LFE_num_scale": 5})


def test_failed_write_leaves_nothing(real_sized, tmp_path):
    with pytest.raises(IdentityError, match="its folder .* does not exist"):
        save_identity(real_sized, tmp_path / "missing-folder" / "me.safetensors")
    assert list(tmp_path.iterdir()) == []
