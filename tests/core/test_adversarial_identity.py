"""Adversarial identity files and identities, built in the real format (.safetensors).

A wrong identity gets an IdentityError in one line naming the tensor or the bound, before it
costs reads or memory; half-precision files load as float32 and sample; saving never replaces a
file unless asked, and a failed save leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consisid_core.errors import IdentityError
from consisid_core.files import numbered_path
from consisid_core.identity import MAX_FILE_BYTES, MAX_SCALES, Identity, load_identity, save_identity
from consisid_core.sampling import sample
from consisid_core.tiny import random_identity
from refusals import assert_refused

TINY = {"LFE_id_dim": 544, "LFE_vit_dim": 32, "LFE_num_scale": 5}
"""The tiny checkpoint's identity sizes (`tiny.TINY_TRANSFORMER`)."""
AGAIN = "make the identity again from a photo with the face models"


def _re(value) -> str:
    """`value` (a path, a tensor name) as a literal in a `match` pattern."""
    return re.escape(str(value))


def refused(match: str, call, folder: Path | None = None) -> str:
    """`assert_refused`, exactly IdentityError, nothing under `folder` changed."""
    return assert_refused(call, match, IdentityError, exact=True, unchanged=folder)


@pytest.fixture
def ident() -> Identity:
    return random_identity(TINY, seed=11)


@pytest.fixture
def saved(ident, tmp_path) -> Path:
    return save_identity(ident, tmp_path / "me.safetensors")


def _rewrite(path: Path, edit) -> Path:
    tensors = load_file(path)
    tensors = edit(tensors) or tensors
    save_file(tensors, path, metadata={"format": "consisid-identity", "version": "1"})
    return path


# ---------------------------------------------------------------------------------------------
# values


VALUES = [(math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite"), (1e38, r"absurdly large \(1e\+38\)")]


@pytest.mark.parametrize("value,described", VALUES, ids=["nan", "inf", "-inf", "1e38"])
@pytest.mark.parametrize("key", ["id_cond", "kps", "id_vit_hidden.2"])
def test_a_file_with_nan_inf_or_absurd_values(saved, key, value, described):
    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value

    _rewrite(saved, poison)
    message = refused(rf"'{_re(saved)}': '{_re(key)}' holds {described} values: {AGAIN}", lambda: load_identity(saved))
    assert key in message


@pytest.mark.parametrize("value,described", VALUES, ids=["nan", "inf", "-inf", "1e38"])
@pytest.mark.parametrize("field", ["id_cond", "kps", "id_vit_hidden"])
def test_an_identity_with_nan_inf_or_absurd_values(ident, field, value, described):
    id_cond, hidden, kps = ident.id_cond.clone(), [h.clone() for h in ident.id_vit_hidden], ident.kps.clone()
    {"id_cond": id_cond, "kps": kps, "id_vit_hidden": hidden[4]}[field].view(-1)[0] = value
    name = "id_vit_hidden.4" if field == "id_vit_hidden" else field
    refused(rf"this identity: '{_re(name)}' holds {described} values: {AGAIN}",
            lambda: Identity(id_cond, tuple(hidden), kps, ident.face_image))


def test_a_value_beyond_float32_in_a_float64_file(saved):
    _rewrite(saved, lambda t: t | {"id_cond": torch.full((1, 544), 1e300, dtype=torch.float64)})
    refused(rf"'id_cond' holds infinite values: {AGAIN}", lambda: load_identity(saved))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_files_load_as_float32_and_sample(tiny_model, text, tmp_path, dtype):
    ident = random_identity(tiny_model.config, seed=5)
    path = tmp_path / "half.safetensors"
    save_file(
        {"id_cond": ident.id_cond.to(dtype), "kps": ident.kps.to(dtype), "face_image": ident.face_image}
        | {f"id_vit_hidden.{i}": h.to(dtype) for i, h in enumerate(ident.id_vit_hidden)},
        path,
    )
    loaded = load_identity(path)
    assert loaded.id_cond.dtype == loaded.kps.dtype == torch.float32
    assert all(h.dtype == torch.float32 for h in loaded.id_vit_hidden)
    assert loaded.face_image.dtype == torch.uint8 and torch.equal(loaded.face_image, ident.face_image)
    rounded = Identity(
        ident.id_cond.to(dtype).float(), tuple(h.to(dtype).float() for h in ident.id_vit_hidden),
        ident.kps.to(dtype).float(), ident.face_image,
    )
    assert torch.equal(loaded.id_cond, rounded.id_cond)
    assert all(torch.equal(a, b) for a, b in zip(loaded.id_vit_hidden, rounded.id_vit_hidden))
    assert not torch.equal(loaded.id_cond, ident.id_cond)  # it was rounded: the file was half precision
    loaded.check_compatible(tiny_model.config)

    latents = sample(tiny_model, loaded, text, steps=1, seed=3)
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, sample(tiny_model, rounded, text, steps=1, seed=3))
    full = sample(tiny_model, ident, text, steps=1, seed=3)
    assert (latents - full).abs().max() < 0.05  # the rounding moves the result only a little


# ---------------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize(
    "old,new",
    [
        ("id_vit_hidden.1", "id_vit_hidden.\u0661"),  # an Arabic-Indic 1: int() reads it, the file format does not
        ("id_vit_hidden.1", "id_vit_hidden.01"),
        ("id_vit_hidden.1", "id_vit_hidden.+1"),
        ("id_vit_hidden.1", "id_vit_hidden.1 "),
        ("kps", "KPS"),
    ],
    ids=["arabic-digit", "leading-zero", "plus-sign", "trailing-space", "upper-case"],
)
def test_keys_spelled_another_way(saved, old, new):
    _rewrite(saved, lambda t: {(new if k == old else k): v for k, v in t.items()})
    refused(rf"is not a ConsisID identity file: unexpected tensor '{_re(new)}' \(it holds id_cond, kps, face_image and "
            r"id_vit_hidden.0, .1, …\)", lambda: load_identity(saved))


@pytest.mark.parametrize("extra", ["extra", "id_cond.1", "id_vit_hidden", "id_vit_hidden.-1", "__metadata__x"])
def test_unexpected_extra_keys(saved, extra):
    _rewrite(saved, lambda t: t | {extra: torch.zeros(2)})
    refused(rf"unexpected tensor '{_re(extra)}'", lambda: load_identity(saved))


def test_a_key_with_a_newline_is_shown_on_one_line(saved):
    _rewrite(saved, lambda t: t | {"id_cond\nforged": torch.zeros(2)})
    refused(r"unexpected tensor 'id_cond\\nforged'", lambda: load_identity(saved))


def test_a_gap_in_the_hidden_states(saved):
    _rewrite(saved, lambda t: {k: v for k, v in t.items() if k != "id_vit_hidden.2"})
    refused(r"missing id_vit_hidden.2 \(found face_image, id_cond, id_vit_hidden.0, id_vit_hidden.1, "
            r"id_vit_hidden.3, id_vit_hidden.4, kps\)", lambda: load_identity(saved))


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    "shape,message",
    [
        ((0, 0, 3), r"face_image is 0×0; it must be 16 to 4096 pixels a side"),
        ((1, 1, 3), r"face_image is 1×1; it must be 16 to 4096 pixels a side"),
        ((15, 512, 3), r"face_image is 512×15; it must be 16 to 4096"),
        ((5000, 5000, 3), r"face_image is 5000×5000; it must be 16 to 4096 pixels a side \(the face models make"),
        ((64, 64, 4), r"face_image must be uint8 \[H, W, 3\], found uint8 \[64, 64, 4\]"),
        ((64, 64), r"face_image must be uint8 \[H, W, 3\], found uint8 \[64, 64\]"),
    ],
    ids=["0x0", "1x1", "15-high", "5000x5000", "rgba", "grey"],
)
def test_face_images_of_no_use(saved, ident, shape, message):
    face = torch.zeros(shape, dtype=torch.uint8)
    _rewrite(saved, lambda t: t | {"face_image": face})
    refused(rf"'{_re(saved)}': {message}", lambda: load_identity(saved))
    refused(rf"this identity: {message}", lambda: Identity(ident.id_cond, ident.id_vit_hidden, ident.kps, face))


def test_the_largest_face_image_side_loads(saved):
    _rewrite(saved, lambda t: t | {"face_image": torch.zeros(16, 4096, 3, dtype=torch.uint8)})
    assert load_identity(saved).face_image.shape == (16, 4096, 3)


@pytest.mark.parametrize("count", [MAX_SCALES + 1, 99])
def test_more_hidden_states_than_any_model_uses(saved, ident, count):
    hidden = ident.id_vit_hidden[0]
    _rewrite(saved, lambda t: t | {f"id_vit_hidden.{i}": hidden.clone() for i in range(count)})
    refused(rf"'{_re(saved)}': {count} hidden states; ConsisID uses 5 \(at most {MAX_SCALES}\)",
            lambda: load_identity(saved))
    refused(rf"this identity: {count} hidden states",
            lambda: Identity(ident.id_cond, (hidden,) * count, ident.kps, ident.face_image))


def test_a_hundredth_hidden_state_is_not_even_a_key(saved):
    _rewrite(saved, lambda t: t | {"id_vit_hidden.100": torch.zeros(1, 577, 32)})
    refused(r"unexpected tensor 'id_vit_hidden.100'", lambda: load_identity(saved))


def test_a_file_over_the_size_bound_is_refused_unread(sentinels):
    """A 300 MB file (sparse: it takes no disk) is refused from its size alone, never opened."""
    path = sentinels.make("huge.safetensors", b"")
    os.truncate(path, 300 * 2**20)
    assert path.stat().st_size > MAX_FILE_BYTES
    start = time.perf_counter()
    refused(r"huge.safetensors' is 300 MB; an identity file is about 13 MB \(at most 256 MB\): this is not one",
            lambda: load_identity(path))
    assert time.perf_counter() - start < 1


def _header_file(path: Path, header: dict, payload: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + payload)
    return path


@pytest.mark.parametrize(
    "header,payload",
    [
        ({"id_cond": {"dtype": "F32", "shape": [1, 10**12], "data_offsets": [0, 4 * 10**12]}}, bytes(16)),
        ({"id_cond": {"dtype": "F32", "shape": [1, 10**12], "data_offsets": [0, 16]}}, bytes(16)),
        ({"id_vit_hidden.0": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16)),
        ({"id_cond": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, bytes(16)),
    ],
    ids=["offsets-past-the-end", "shape-beyond-data", "shape-overflowing", "negative-shape"],
)
def test_a_header_that_declares_huge_tensors(tmp_path, header, payload):
    path = _header_file(tmp_path / "forged.safetensors", header, payload)
    start = time.perf_counter()
    refused(rf"'{_re(path)}' is not a readable \.safetensors identity file \(", lambda: load_identity(path))
    assert time.perf_counter() - start < 1


def test_a_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "forged.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    refused(r"is not a readable \.safetensors identity file \(.*header too large", lambda: load_identity(path))


# ---------------------------------------------------------------------------------------------
# saving


def test_save_never_replaces_a_file(ident, saved):
    other = random_identity(TINY, seed=12)
    data = saved.read_bytes()
    refused(rf"'{_re(saved)}' already exists; give a new file name", lambda: save_identity(other, saved), saved.parent)
    assert saved.read_bytes() == data
    save_identity(other, saved, overwrite=True)
    assert torch.equal(load_identity(saved).id_cond, other.id_cond)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["me.safetensors"]


def test_save_refuses_a_folder_even_with_overwrite(ident, tmp_path):
    (tmp_path / "taken.safetensors").mkdir()
    path = tmp_path / "taken.safetensors"
    refused(r"taken.safetensors' already exists", lambda: save_identity(ident, path, overwrite=True), tmp_path)


def test_a_save_that_fails_after_writing_leaves_no_temporary_file(ident, tmp_path):
    """A dangling link looks free to exists() but is a taken name: the write is finished, then
    publishing it fails. Neither the link, its target, nor a temporary file is left changed."""
    link = tmp_path / "taken.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    refused(rf"'{_re(link)}' already exists; nothing was replaced", lambda: save_identity(ident, link), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.safetensors"]
    assert not (tmp_path / "nowhere.safetensors").exists()


def test_a_name_too_long_for_the_file_system(ident, tmp_path):
    path = tmp_path / ("n" * 300 + ".safetensors")
    refused(r"cannot write '.*': File name too long", lambda: save_identity(ident, path), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_long_name_the_file_system_allows(ident, tmp_path):
    path = tmp_path / ("n" * 240 + ".safetensors")  # 252 bytes: the temporary name must not be longer
    save_identity(ident, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(load_identity(path).id_cond, ident.id_cond)


def test_hidden_states_that_share_memory_are_saved(ident, tmp_path):
    shared = ident.id_vit_hidden[0]
    same = Identity(ident.id_cond, (shared,) * 5, ident.kps, ident.face_image)
    path = save_identity(same, tmp_path / "same.safetensors")
    back = load_identity(path)
    assert all(torch.equal(h, shared) for h in back.id_vit_hidden)
    assert [p.name for p in tmp_path.iterdir()] == ["same.safetensors"]


def test_metadata_cannot_forge_the_format(ident, tmp_path):
    forged = Identity(ident.id_cond, ident.id_vit_hidden, ident.kps, ident.face_image,
                      {"format": "other", "version": "99", "source_image": "a\nb.png"})
    path = save_identity(forged, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "consisid-identity" and f.metadata()["version"] == "1"
    assert load_identity(path).metadata == {"source_image": "a\nb.png"}


# ---------------------------------------------------------------------------------------------
# numbered output names


def test_numbered_path_takes_one_above_the_highest_after_a_deletion(tmp_path):
    names = []
    for _ in range(3):
        path = numbered_path(tmp_path, "ConsisID", ".safetensors")
        path.write_bytes(b"x")
        names.append(path.name)
    assert names == [f"ConsisID_0000{i}_.safetensors" for i in (1, 2, 3)]
    (tmp_path / names[1]).unlink()
    assert numbered_path(tmp_path, "ConsisID", ".safetensors").name == "ConsisID_00004_.safetensors"
    (tmp_path / names[2]).unlink()  # the highest gone: numbering follows what is there
    assert numbered_path(tmp_path, "ConsisID", ".safetensors").name == "ConsisID_00002_.safetensors"


def test_numbered_path_reads_only_its_own_names(tmp_path):
    for name in ("ConsisID_00007_.mp4", "ConsisID_\u0669\u0669_.safetensors", "ConsisID_00100_.safetensors.partial",
                 "Other_00050_.safetensors", "ConsisID_00003_.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    assert numbered_path(tmp_path, "ConsisID", ".safetensors").name == "ConsisID_00004_.safetensors"
    assert numbered_path(tmp_path / "missing", "ConsisID", ".mp4") == tmp_path / "missing" / "ConsisID_00001_.mp4"
