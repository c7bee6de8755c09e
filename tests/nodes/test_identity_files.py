"""nodes/identity_files.py: Save and Load Identity round trip; names leading out of the folders, links and
races refused in one line naming the value and the fix, nothing read or written outside the folders."""

import os
import shutil
import sys

import pytest
import torch

from node_tools import identity_bytes, model, one_line  # noqa: F401 (fixture)
from refusals import assert_refused, folder_state
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError, IdentityError  # noqa: E402
from consisid_pack.consisid_core.files import shown  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

SAVE, LOAD = NODE_CLASS_MAPPINGS["ConsisIDSaveIdentity"], NODE_CLASS_MAPPINGS["ConsisIDLoadIdentity"]


@pytest.mark.slow
def test_identity_files_round_trip_and_first_frame_input(home, tiny_dir):
    from consisid_core.tiny import random_identity

    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    identity = random_identity(model.config, seed=2)
    result = n["ConsisIDSaveIdentity"]().save(identity, "people/me")
    saved = home / "output" / "people" / "me_00001_.safetensors"
    assert saved.is_file() and result["ui"]["text"] == [saved.name]
    n["ConsisIDSaveIdentity"]().save(identity, "people/me")
    assert (home / "output" / "people" / "me_00002_.safetensors").is_file()

    shutil.copy(saved, home / "input" / "me.safetensors")
    loader = n["ConsisIDLoadIdentity"]
    assert loader.INPUT_TYPES()["required"]["identity_file"][0] == ["me.safetensors"]
    assert "is not one of the identity files in the input folder" in loader.VALIDATE_INPUTS("gone.safetensors")
    loaded, face = loader().load("me.safetensors")
    assert torch.equal(loaded.id_cond, identity.id_cond)
    assert face.shape == (1, 64, 64, 3)

    width = model.config.text_embed_dim
    from consisid_core.text import TextEmbeddings

    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    sampler = n["ConsisIDSampler"]()
    args = (model, loaded, text, 1, 2, 6.0, False, "ddim", 9, 96, 64, 1.0)
    default = sampler.sample(*args)[0]["samples"]
    from_face = sampler.sample(*args, start_image=face)[0]["samples"]
    assert torch.equal(default, from_face)  # the face is the default first frame
    other = sampler.sample(*args, start_image=torch.rand(2, 64, 64, 3))[0]["samples"]
    assert not torch.equal(default, other)


def test_the_sentinel_witnesses_see_a_read(tmp_path, sentinels, identity):
    """The check every test here relies on can fail: a read from Python (audit hook) and one from
    Rust (safetensors: the access time) are each seen; then both files are let go, so that this
    test itself passes."""
    from safetensors import safe_open

    python_read = sentinels.make("witness.bin", b"secret")
    rust_read = sentinels.make("witness.safetensors", identity_bytes(tmp_path, identity))
    assert sentinels.read() == []
    assert python_read.read_bytes() == b"secret"
    assert sentinels.read() == [str(python_read)]
    with safe_open(rust_read, framework="pt") as f:
        f.get_tensor("id_cond")
    assert sentinels.read() == [str(python_read), str(rust_read)]
    sentinels.paths.clear()


# ---------------------------------------------------------------------------------------------
# Load Identity

LISTED_ONLY = (
    "identity_file '<name>' is not one of the identity files in the input folder; "
    "pick one from the list (refresh it after adding files)"
)
NOT_INSIDE = (
    "'<name>' is not a file name inside the input folder: give a name relative to that folder, "
    "without '..' or a leading '/', as its file list shows it"
)


def hostile_identity_names(home, tmp_path, sentinel) -> list[str]:
    """Names leading out of input/, half of them to an existing (valid identity) file."""
    missing = tmp_path / "nowhere" / "x.safetensors"
    return [
        "../x.safetensors",
        os.path.relpath(sentinel, home / "input"),  # ../../../outside0/person.safetensors: exists
        "sub/../../x.safetensors",
        str(sentinel),  # absolute, exists
        str(missing),  # absolute, does not
        "me\0.safetensors",
        "me.safetensors\n../../x",
        "..\\x.safetensors",
        "C:\\x.safetensors",
        "\\\\server\\share\\x.safetensors",
    ]


def test_load_identity_refuses_names_leading_out_of_the_input_folder(home, tmp_path, sentinels, identity):
    (home / "input" / "me.safetensors").write_bytes(identity_bytes(tmp_path, identity))
    sentinel = sentinels.make("person.safetensors", identity_bytes(tmp_path, identity))
    before = folder_state(tmp_path)
    names = hostile_identity_names(home, tmp_path, sentinel)
    assert os.path.exists(os.path.join(home / "input", names[1])) and not os.path.exists(names[4])

    assert LOAD.INPUT_TYPES()["required"]["identity_file"][0] == ["me.safetensors"]
    assert LOAD.VALIDATE_INPUTS("me.safetensors") is True
    assert isinstance(LOAD.IS_CHANGED("me.safetensors"), int)
    validate, load = set(), set()
    for name in names:
        message = one_line(LOAD.VALIDATE_INPUTS(name))
        assert f"'{shown(name)}'" in message
        validate.add(message.replace(shown(name), "<name>"))
        assert LOAD.IS_CHANGED(name) == "", name
        message = assert_refused(lambda: LOAD().load(name), error=ConsisIDError)
        assert f"'{shown(name)}'" in message
        load.add(message.replace(shown(name), "<name>"))
    # the same words whether or not the file exists: they tell nothing about the disk
    assert validate == {LISTED_ONLY} and load == {NOT_INSIDE}
    for message in (LISTED_ONLY, NOT_INSIDE):
        assert not any(word in message.lower() for word in ("exist", "found", "missing"))
    assert folder_state(tmp_path) == before


def test_load_identity_refuses_links_from_the_input_folder_to_outside(home, tmp_path, sentinels, identity):
    sentinel = sentinels.make("linked/person.safetensors", identity_bytes(tmp_path, identity))
    (home / "input" / "me.safetensors").symlink_to(sentinel)
    (home / "input" / "away").symlink_to(sentinel.parent, target_is_directory=True)
    (home / "input" / "mine").mkdir()
    (home / "input" / "mine" / "ok.safetensors").write_bytes(identity_bytes(tmp_path, identity))
    before = folder_state(tmp_path)

    assert LOAD.INPUT_TYPES()["required"]["identity_file"][0] == ["mine/ok.safetensors"]
    loaded, face = LOAD().load("mine/ok.safetensors")
    assert torch.equal(loaded.id_cond, identity.id_cond) and face.shape == (1, 64, 64, 3)
    for name in ("me.safetensors", "away/person.safetensors"):
        assert one_line(LOAD.VALIDATE_INPUTS(name)) == LISTED_ONLY.replace("<name>", name)
        assert LOAD.IS_CHANGED(name) == ""
        message = assert_refused(lambda: LOAD().load(name), error=ConsisIDError)
        assert message == f"'{name}' leads outside the input folder through a link; only files inside it are used"
    assert folder_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Save Identity


def output_files(home) -> list[str]:
    return sorted(str(p.relative_to(home / "output")) for p in (home / "output").rglob("*"))


@pytest.mark.parametrize(
    "prefix, says",
    [
        ("../x", "is not a file name inside the output folder"),
        ("/tmp/x", "is not a file name inside the output folder"),
        ("a/../../x", "is not a file name inside the output folder"),
        ("", "is not a file name inside the output folder"),
        ("people/me\0", "is not a file name inside the output folder"),
        ("..\\x", "is not a file name inside the output folder"),
        ("C:\\x", "is not a file name inside the output folder"),
        ("%date:yyyy%/../../x", "is not a file name inside the output folder"),
        (".", "names the output folder, not a file: end it with a name"),
        ("./", "names the output folder, not a file: end it with a name"),
    ],
)
def test_save_identity_refuses_prefixes_leading_out_of_the_output_folder(home, tmp_path, identity, prefix, says):
    before, in_tmp = folder_state(tmp_path), set(os.listdir("/tmp"))
    message = one_line(SAVE.VALIDATE_INPUTS(prefix))
    assert says in message
    if prefix and "%" not in prefix:
        assert f"'{shown(prefix)}'" in message
    assert assert_refused(lambda: SAVE().save(identity, prefix), error=ConsisIDError) == message
    assert folder_state(tmp_path) == before and output_files(home) == []
    assert {n for n in set(os.listdir("/tmp")) - in_tmp if n.startswith("x")} == set()


def test_save_identity_refuses_absolute_and_linked_prefixes_to_an_existing_folder(home, tmp_path, identity):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "output" / "away").symlink_to(elsewhere, target_is_directory=True)
    before = folder_state(tmp_path)
    for prefix, says in (
        (str(elsewhere / "x"), "is not a file name inside the output folder"),
        ("away/x", "leads outside the output folder through a link"),
    ):
        message = one_line(SAVE.VALIDATE_INPUTS(prefix))
        assert message.startswith(f"'{prefix}' {says}")
        assert assert_refused(lambda: SAVE().save(identity, prefix), error=ConsisIDError) == message
    assert folder_state(tmp_path) == before and list(elsewhere.iterdir()) == []


def test_save_identity_numbers_above_the_highest_and_never_overwrites(home, identity, model):
    folder = home / "output" / "people"
    assert SAVE.VALIDATE_INPUTS("people/me") is True
    names = [SAVE().save(identity, "people/me")["ui"]["text"][0] for _ in range(3)]
    assert names == [f"me_0000{i}_.safetensors" for i in (1, 2, 3)]
    (folder / names[1]).unlink()
    kept = folder_state(folder)
    other = random_identity(model.config, seed=4)
    assert SAVE().save(other, "people/me")["ui"]["text"] == ["me_00004_.safetensors"]
    after = folder_state(folder)
    assert {k: after[k] for k in kept} == kept  # 1 and 3 untouched, 2 not reused
    (folder / "me_00009_.safetensors").write_bytes(b"someone else's")
    assert SAVE().save(other, "people/me")["ui"]["text"] == ["me_00010_.safetensors"]
    assert (folder / "me_00009_.safetensors").read_bytes() == b"someone else's"
    assert output_files(home) == ["people"] + [f"people/me_000{n:02}_.safetensors" for n in (1, 3, 4, 9, 10)]


def test_save_identity_never_replaces_a_file_that_appears_while_it_writes(home, identity, monkeypatch):
    """Another save takes the numbered name between the numbering and the move into place: the
    tensors writer (safetensors', not ours) is wrapped to play that other save."""
    module = sys.modules["consisid_pack.consisid_core.identity"]
    write, target = module.save_file, home / "output" / "people" / "me_00001_.safetensors"

    def racing(tensors, path, metadata=None):
        write(tensors, path, metadata=metadata)
        target.write_bytes(b"the other save's file")

    monkeypatch.setattr(module, "save_file", racing)
    message = assert_refused(lambda: SAVE().save(identity, "people/me"), error=IdentityError)
    assert message == f"'{target}' already exists; nothing was replaced"
    assert target.read_bytes() == b"the other save's file"
    assert output_files(home) == ["people", "people/me_00001_.safetensors"]  # no partial file left


@pytest.mark.parametrize("case", ["name too long", "a file where a folder goes"])
def test_save_identity_turns_file_system_errors_into_one_line(home, tmp_path, identity, case):
    if case == "name too long":
        prefix = "x" * 300
    else:
        (home / "output" / "people").write_bytes(b"a file")
        prefix = "people/me"
    before = folder_state(tmp_path)
    assert SAVE.VALIDATE_INPUTS(prefix) is True  # only writing tells
    message = assert_refused(lambda: SAVE().save(identity, prefix), error=ConsisIDError)
    assert message.startswith("cannot write ")
    assert ("File name too long" if case == "name too long" else "File exists") in message
    assert folder_state(tmp_path) == before
