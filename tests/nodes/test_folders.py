"""nodes/folders.py: the model lists come from the model folders; names resolve inside their folder
or are refused in one line."""

from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

def test_model_lists_come_from_the_model_folders(home):
    models = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"].INPUT_TYPES()["required"]
    assert models["model"][0] == ["tiny", "diffusion_models/tiny.safetensors"]
    assert models["vae"][0] == ["(from checkpoint)", "tiny.safetensors"]
    faces = NODE_CLASS_MAPPINGS["ConsisIDFaceModelsLoader"].INPUT_TYPES()["required"]
    assert faces["face_encoder"][0] == ["tiny"]
