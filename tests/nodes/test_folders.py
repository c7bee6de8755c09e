"""nodes/folders.py: the model lists come from the model folders; names resolve inside their folder
or are refused in one line."""

import re

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS, folders  # noqa: E402


def test_model_lists_come_from_the_model_folders(home):
    models = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"].INPUT_TYPES()["required"]
    assert models["model"][0] == ["tiny", "diffusion_models/tiny.safetensors"]
    assert models["vae"][0] == ["(from checkpoint)", "tiny.safetensors"]
    faces = NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"].INPUT_TYPES()["required"]
    assert faces["face_encoder"][0] == ["tiny"]


def test_outside_comfyui_the_folders_are_under_consisid_home(home):
    (home / "models" / "vae" / "notes.txt").write_text("not weights")
    (home / "models" / "vae" / "more").mkdir()
    (home / "models" / "vae" / "more" / "b.safetensors").write_bytes(b"")
    assert folders.folders("vae") == [home / "models" / "vae"]
    assert folders.files("vae") == ["more/b.safetensors", "tiny.safetensors"]
    assert folders.files("loras") == []  # a folder not made yet: an empty list
    assert folders.file_path("vae", "more/b.safetensors") == home / "models" / "vae" / "more" / "b.safetensors"
    assert (folders.input_dir(), folders.output_dir()) == (home / "input", home / "output")
    assert folders.input_file("a/b.png") == home / "input" / "a" / "b.png"


def test_a_missing_model_file_is_refused_naming_its_folder(home):
    assert_refused(lambda: folders.file_path("vae", "gone.safetensors"),
                   "^" + re.escape("'gone.safetensors' is not in the vae model folders; put it there and refresh the list"),
                   FileNotFoundError, unchanged=home)


def test_save_paths_are_numbered_inside_the_output_folder(home):
    first = folders.save_path("clips/run", "x.mp4")
    assert first == home / "output" / "clips" / "run_00001_x.mp4" and first.parent.is_dir() and not first.exists()
    first.write_bytes(b"")
    assert folders.save_path("clips/run", "x.mp4").name == "run_00002_x.mp4"
    for prefix in ("../run", "clips/../../run"):
        assert_refused(lambda: folders.save_path(prefix, "x.mp4"),
                       "^" + re.escape(f"'{prefix}' is not a file name inside the output folder"), ConsisIDError,
                       unchanged=home.parent)
