"""The nodes against hostile inputs: names that lead out of their folders, files planted outside
them, values beyond what a node declares. Each is refused in one line that names the value and
the fix, before any work, and nothing is read or written outside the folders."""

import math
import os
import sys
import time

import pytest
import torch

from workflow_tools import import_pack  # noqa: E402

pack = import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError, FaceError, IdentityError  # noqa: E402
from consisid_pack.consisid_core.files import shown  # noqa: E402
from consisid_pack.consisid_core.identity import save_identity  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS as NODES  # noqa: E402
from consisid_pack.nodes import folders  # noqa: E402

SAVE, LOAD = NODES["ConsisIDSaveIdentity"], NODES["ConsisIDLoadIdentity"]
LOADER, SAMPLER, DECODE = NODES["ConsisIDModelLoader"], NODES["ConsisIDSampler"], NODES["ConsisIDVAEDecode"]
FACE_LOADER, FACE_EMBED = NODES["ConsisIDFaceModelsLoader"], NODES["ConsisIDFaceEmbed"]


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.fixture
def calls(model):
    """The names of the model's parts run meanwhile: transformer, VAE encoder and decoder (their
    forward pre-hooks), to see that a refusal comes before any of them."""
    seen: list[str] = []
    parts = {"transformer": model.transformer, "vae encoder": model.vae.encoder, "vae decoder": model.vae.decoder}
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: seen.append(n)) for name, m in parts.items()]
    yield seen
    for handle in handles:
        handle.remove()


def one_line(message) -> str:
    """A message as ComfyUI shows it: text, on one line, no control characters, no traceback."""
    assert isinstance(message, str) and message.strip(), message
    assert all(c.isprintable() for c in message), repr(message)
    assert "Traceback" not in message
    return message


def refusal(error: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    return one_line(str(info.value))


def snapshot(root) -> dict[str, tuple]:
    """Every entry under `root` (links not followed) with its kind, size and modification time."""
    entries = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            entries[os.path.relpath(path, root)] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return entries


def identity_bytes(tmp_path, identity) -> bytes:
    made = tmp_path / "made"
    made.mkdir(exist_ok=True)
    path = save_identity(identity, made / f"{len(list(made.iterdir()))}.safetensors")
    return path.read_bytes()


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
    before = snapshot(tmp_path)
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
        message = refusal(ConsisIDError, LOAD().load, name)
        assert f"'{shown(name)}'" in message
        load.add(message.replace(shown(name), "<name>"))
    # the same words whether or not the file exists: they tell nothing about the disk
    assert validate == {LISTED_ONLY} and load == {NOT_INSIDE}
    for message in (LISTED_ONLY, NOT_INSIDE):
        assert not any(word in message.lower() for word in ("exist", "found", "missing"))
    assert snapshot(tmp_path) == before


def test_load_identity_refuses_links_from_the_input_folder_to_outside(home, tmp_path, sentinels, identity):
    sentinel = sentinels.make("linked/person.safetensors", identity_bytes(tmp_path, identity))
    (home / "input" / "me.safetensors").symlink_to(sentinel)
    (home / "input" / "away").symlink_to(sentinel.parent, target_is_directory=True)
    (home / "input" / "mine").mkdir()
    (home / "input" / "mine" / "ok.safetensors").write_bytes(identity_bytes(tmp_path, identity))
    before = snapshot(tmp_path)

    assert LOAD.INPUT_TYPES()["required"]["identity_file"][0] == ["mine/ok.safetensors"]
    loaded, face = LOAD().load("mine/ok.safetensors")
    assert torch.equal(loaded.id_cond, identity.id_cond) and face.shape == (1, 64, 64, 3)
    for name in ("me.safetensors", "away/person.safetensors"):
        assert one_line(LOAD.VALIDATE_INPUTS(name)) == LISTED_ONLY.replace("<name>", name)
        assert LOAD.IS_CHANGED(name) == ""
        message = refusal(ConsisIDError, LOAD().load, name)
        assert message == f"'{name}' leads outside the input folder through a link; only files inside it are used"
    assert snapshot(tmp_path) == before


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
    before, in_tmp = snapshot(tmp_path), set(os.listdir("/tmp"))
    message = one_line(SAVE.VALIDATE_INPUTS(prefix))
    assert says in message
    if prefix and "%" not in prefix:
        assert f"'{shown(prefix)}'" in message
    assert refusal(ConsisIDError, SAVE().save, identity, prefix) == message
    assert snapshot(tmp_path) == before and output_files(home) == []
    assert {n for n in set(os.listdir("/tmp")) - in_tmp if n.startswith("x")} == set()


def test_save_identity_refuses_absolute_and_linked_prefixes_to_an_existing_folder(home, tmp_path, identity):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "output" / "away").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(tmp_path)
    for prefix, says in (
        (str(elsewhere / "x"), "is not a file name inside the output folder"),
        ("away/x", "leads outside the output folder through a link"),
    ):
        message = one_line(SAVE.VALIDATE_INPUTS(prefix))
        assert message.startswith(f"'{prefix}' {says}")
        assert refusal(ConsisIDError, SAVE().save, identity, prefix) == message
    assert snapshot(tmp_path) == before and list(elsewhere.iterdir()) == []


def test_save_identity_numbers_above_the_highest_and_never_overwrites(home, identity, model):
    folder = home / "output" / "people"
    assert SAVE.VALIDATE_INPUTS("people/me") is True
    names = [SAVE().save(identity, "people/me")["ui"]["text"][0] for _ in range(3)]
    assert names == [f"me_0000{i}_.safetensors" for i in (1, 2, 3)]
    (folder / names[1]).unlink()
    kept = snapshot(folder)
    other = random_identity(model.config, seed=4)
    assert SAVE().save(other, "people/me")["ui"]["text"] == ["me_00004_.safetensors"]
    after = snapshot(folder)
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
    message = refusal(IdentityError, SAVE().save, identity, "people/me")
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
    before = snapshot(tmp_path)
    assert SAVE.VALIDATE_INPUTS(prefix) is True  # only writing tells
    message = refusal(ConsisIDError, SAVE().save, identity, prefix)
    assert message.startswith("cannot write ")
    assert ("File name too long" if case == "name too long" else "File exists") in message
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Model loaders


def test_model_loader_takes_only_listed_files(home, tmp_path, sentinels, tiny_dir):
    vae_bytes = (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    sentinel = sentinels.make("sentinel.safetensors", vae_bytes)  # a VAE that would load
    vae_dir = home / "models" / "vae"
    to_sentinel = os.path.relpath(sentinel, vae_dir)
    assert (vae_dir / to_sentinel).is_file()
    single, before = "diffusion_models/tiny.safetensors", snapshot(tmp_path)

    for model_name in ("../x", "diffusion_models/../../x.safetensors", "/abs/x", "tiny\n"):
        message = one_line(LOADER.VALIDATE_INPUTS(model=model_name, vae="tiny.safetensors"))
        assert message == (
            f"model '{shown(model_name)}' is not one of the choices; pick one from the list (refresh it after adding files)"
        )
    for vae in ("../../sentinel.safetensors", to_sentinel, str(sentinel)):
        message = one_line(LOADER.VALIDATE_INPUTS(model=single, vae=vae))
        assert message == f"vae '{vae}' is not one of the choices; pick one from the list (refresh it after adding files)"
        # and where VALIDATE_INPUTS is skipped (the node called by a script): the folder check
        message = refusal(ConsisIDError, folders.file_path, "vae", vae)
        assert message.startswith(f"'{vae}' is not a file name inside the models/vae folder")
        assert refusal(ConsisIDError, LOADER().load, single, vae, "fp32", False).startswith(f"'{vae}' is not a file name")
    climbing = "diffusion_models/../../x.safetensors"
    message = refusal(ConsisIDError, LOADER().load, climbing, "tiny.safetensors", "fp32", False)
    assert message.startswith("'../../x.safetensors' is not a file name inside the models/diffusion_models folder")
    message = refusal(FileNotFoundError, LOADER().load, "../tiny", "(from checkpoint)", "fp32", False)
    assert message == "checkpoint '../tiny' is not in models/consisid or models/diffusers; refresh the list"
    assert snapshot(tmp_path) == before

    # what is listed works
    assert LOADER.VALIDATE_INPUTS(model=single, vae="tiny.safetensors") is True
    assert folders.file_path("vae", "tiny.safetensors") == vae_dir / "tiny.safetensors"
    (loaded,) = LOADER().load(single, "tiny.safetensors", "fp32", False)
    assert loaded.vae.config.latent_channels == 4


def test_face_models_loader_refuses_an_unknown_face_encoder(home):
    assert FACE_LOADER.INPUT_TYPES()["required"]["face_encoder"][0] == ["tiny"]
    for name in ("nope", "../tiny", "tiny/../../tiny", "tiny\n"):
        message = refusal(FileNotFoundError, FACE_LOADER().load, name, "cpu", "cpu")
        assert message == (
            f"face encoder '{shown(name)}' is not in models/consisid; put the ConsisID checkpoint "
            "(with its face_encoder/ folder) there and refresh"
        )


def test_face_embed_refuses_an_empty_or_broken_image(home):
    (face_models,) = FACE_LOADER().load("tiny", "cpu", "cpu")
    message = refusal(FaceError, FACE_EMBED().embed, torch.zeros(0, 64, 64, 3), face_models, -1)
    assert message == ("the image input (float32 [0, 64, 64, 3]) is not an IMAGE: a float batch [images, height, "
                       "width, channels] with at least one pixel and 1 to 4 channels; connect a photo (Load Image)")
    message = refusal(FaceError, FACE_EMBED().embed, torch.zeros(64, 64, 3), face_models, -1)
    assert message.startswith("the image input (float32 [64, 64, 3]) is not an IMAGE")
    image = torch.rand(1, 32, 32, 3)
    image[0, 3, 4, 0] = math.nan
    message = refusal(FaceError, FACE_EMBED().embed, image, face_models, -1)
    assert message == "the image input holds NaN or infinite pixels; connect a photo (Load Image)"
    message = refusal(FaceError, FACE_EMBED().embed, torch.zeros(1, 1, 1, 3), face_models, -1)  # (the tiny detector's answer)
    assert message.startswith("no face found in the input image (1×1 after resizing): use a clearer")


# ---------------------------------------------------------------------------------------------
# Sampler and VAE Decode


@pytest.mark.parametrize(
    "values, says",
    [
        (dict(length=100001), "length 100001 must be a whole number from 1 to 1025"),
        (dict(length=10**400), f"length {'1' + '0' * 119}… must be a whole number from 1 to 1025"),
        (dict(length=49.5), "length 49.5 must be a whole number from 1 to 1025"),
        (dict(length="49"), "length 49 must be a whole number from 1 to 1025"),
        (dict(length=True), "length True must be a whole number from 1 to 1025"),
        (dict(length=50), "length 50 must be 4·k + 1 (49 for ConsisID; e.g. 49)"),
        (dict(width=100000), "width 100000 must be a whole number from 16 to 4096"),
        (dict(width=math.nan), "width nan must be a whole number from 16 to 4096"),
        (dict(width=720.5), "width 720.5 must be a whole number from 16 to 4096"),
        (dict(width=-math.inf), "width -inf must be a whole number from 16 to 4096"),
        (dict(height=-480), "height -480 must be a whole number from 16 to 4096"),
        (dict(height=10**400), f"height {'1' + '0' * 119}… must be a whole number from 16 to 4096"),
    ],
)
def test_sampler_validation_refuses_sizes_beyond_the_declared(values, says):
    assert SAMPLER.VALIDATE_INPUTS(length=49, width=720, height=480) is True
    assert one_line(SAMPLER.VALIDATE_INPUTS(**{"length": 49, "width": 720, "height": 480, **values})) == says


def sample_args(model, identity, text, **changes) -> dict:
    args = dict(
        model=model, identity=identity, text=text, seed=1, steps=1, cfg=6.0, dynamic_cfg=False,
        scheduler="dpm", length=9, width=96, height=64, identity_strength=1.0,
    )
    return {**args, **changes}


def nan_image() -> torch.Tensor:
    image = torch.rand(1, 64, 96, 3)
    image[0, 10, 10, 1] = math.nan
    return image


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(cfg=math.nan), "cfg nan must be a finite number from 0 to 100"),
        (dict(cfg=math.inf), "cfg inf must be a finite number from 0 to 100"),
        (dict(cfg=-1.0), "cfg -1.0 must be a finite number from 0 to 100"),
        (dict(identity_strength=math.nan), "identity strength nan must be a finite number from 0 to 10"),
        (dict(identity_strength=11.0), "identity strength 11.0 must be a finite number from 0 to 10"),
        (dict(seed=-1), "seed -1 must be a whole number from 0 to "),
        (dict(seed=2**64), f"seed {2**64} must be a whole number from 0 to "),
        (dict(steps=0), "steps 0 must be a whole number from 1 to 1000"),
        (dict(steps=5000), "steps 5000 must be a whole number from 1 to 1000"),
        (dict(length=73), "frame count 73 is over this checkpoint's maximum of 72 per pass (8 × its trained 9); "
                          "pass allow_oversize"),
        (dict(length=401), "frame count 401 is over this checkpoint's maximum of 72"),
        (dict(width=100000), "width 100000 is over this checkpoint's maximum of 384"),
        (dict(length=10), "frame count 10 does not fit this checkpoint: it must be 4·k + 1"),
        (dict(start_image=nan_image()), "the first-frame image holds NaN or infinite pixels; connect a Load Image"),
        (dict(start_image=torch.zeros(0, 64, 96, 3)), "the first-frame image (float32 [0, 64, 96, 3]) is not an IMAGE"),
        (dict(start_image=torch.zeros(64, 96, 3)), "the first-frame image (float32 [64, 96, 3]) is not an IMAGE"),
    ],
)
def test_sampler_refuses_bad_values_before_any_work(model, identity, text, calls, changes, says):
    start = time.perf_counter()
    message = refusal(ConsisIDError, SAMPLER().sample, **sample_args(model, identity, text, **changes))
    assert message.startswith(says)
    assert calls == [] and time.perf_counter() - start < 5


@pytest.mark.slow
def test_sampler_oversize_runs_when_allowed(model, identity, text, calls):
    """The counterpart of the refusals: 73 frames with allow_oversize, and the hooks see the work."""
    (latent,) = SAMPLER().sample(**sample_args(model, identity, text, length=73), allow_oversize=True)
    assert latent["samples"].shape == (1, 4, 19, 8, 12)
    assert "transformer" in calls and "vae encoder" in calls


@pytest.mark.parametrize(
    "latent, says",
    [
        ({"samples": torch.zeros(1, 4, 8, 12)},
         "this LATENT (float32 [1, 4, 8, 12]) is not a video latent [batch, channels, frames, h, w] of 4 channels "
         "with a frame in it: connect the LATENT of ConsisID Sampler"),
        ({"samples": torch.zeros(1, 16, 3, 8, 12)}, "this LATENT (float32 [1, 16, 3, 8, 12]) is not a video latent"),
        ({"samples": torch.zeros(0, 4, 3, 8, 12)}, "this LATENT (float32 [0, 4, 3, 8, 12]) is not a video latent"),
        ({"samples": torch.zeros(1, 4, 3, 8, 12, dtype=torch.int64)}, "this LATENT (int64 [1, 4, 3, 8, 12]) is not"),
        ({"samples": torch.full((1, 4, 3, 8, 12), math.nan)},
         "the LATENT: 'samples' holds NaN values: the sampling diverged; most often half-precision (fp16) weights"),
        ({"samples": torch.full((1, 4, 3, 8, 12), -math.inf)}, "the LATENT: 'samples' holds infinite values"),
        ({}, "this LATENT (NoneType) is not a video latent"),
        ({"samples": [[0.0]]}, "this LATENT (list) is not a video latent"),
        ("not a latent", "this LATENT (str) is not a video latent"),
    ],
)
def test_vae_decode_refuses_what_is_not_a_consisid_latent(model, calls, latent, says):
    message = refusal(ConsisIDError, DECODE().decode, model, latent, False, 240, 360, 40, 72, False)
    assert message.startswith(says)
    assert calls == []


def test_vae_decode_of_a_good_latent_runs_the_decoder(model, calls):
    (frames,) = DECODE().decode(model, {"samples": torch.zeros(1, 4, 1, 8, 12)}, False, 240, 360, 40, 72, False)
    assert frames.shape == (1, 64, 96, 3) and set(calls) == {"vae decoder"}
