"""nodes/models.py: ConsisID Model Loader on a checkpoint folder or single files, and its refusals
of names that are not in its lists."""

import os

import pytest
import torch

from node_tools import one_line
from refusals import assert_refused, folder_state
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.consisid_core.files import shown  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from consisid_pack.nodes import folders  # noqa: E402

LOADER = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]


def test_loader_validation_names_the_value_and_the_fix(home):
    loader = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]
    single = "diffusion_models/tiny.safetensors"
    assert "pick the CogVideoX VAE" in loader.VALIDATE_INPUTS(model=single, vae="(from checkpoint)")
    assert loader.VALIDATE_INPUTS(model=single, vae="tiny.safetensors") is True


def test_single_file_model_and_a_vae_file(home):
    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("diffusion_models/tiny.safetensors", "tiny.safetensors", "bf16", True)
    assert model.checkpoint is None and model.transformer.dtype == torch.bfloat16
    from consisid_pack.consisid_core.errors import ConsisIDError

    with pytest.raises(ConsisIDError, match="no T5 text encoder of its own: .* CLIPLoader"):
        n["ConsisIDTextEncode"]().encode("x", "", model=model)
    (with_vae,) = n["ConsisIDModelLoader"]().load("tiny", "tiny.safetensors", "fp32", False)
    assert with_vae.checkpoint is not None


def test_model_loader_takes_only_listed_files(home, tmp_path, sentinels, tiny_dir):
    vae_bytes = (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    sentinel = sentinels.make("sentinel.safetensors", vae_bytes)  # a VAE that would load
    vae_dir = home / "models" / "vae"
    to_sentinel = os.path.relpath(sentinel, vae_dir)
    assert (vae_dir / to_sentinel).is_file()
    single, before = "diffusion_models/tiny.safetensors", folder_state(tmp_path)

    for model_name in ("../x", "diffusion_models/../../x.safetensors", "/abs/x", "tiny\n"):
        message = one_line(LOADER.VALIDATE_INPUTS(model=model_name, vae="tiny.safetensors"))
        assert message == (
            f"model '{shown(model_name)}' is not one of the choices; pick one from the list (refresh it after adding files)"
        )
    for vae in ("../../sentinel.safetensors", to_sentinel, str(sentinel)):
        message = one_line(LOADER.VALIDATE_INPUTS(model=single, vae=vae))
        assert message == f"vae '{vae}' is not one of the choices; pick one from the list (refresh it after adding files)"
        # and where VALIDATE_INPUTS is skipped (the node called by a script): the folder check
        message = assert_refused(lambda: folders.file_path("vae", vae), error=ConsisIDError)
        assert message.startswith(f"'{vae}' is not a file name inside the models/vae folder")
        assert assert_refused(lambda: LOADER().load(single, vae, "fp32", False), error=ConsisIDError).startswith(f"'{vae}' is not a file name")
    climbing = "diffusion_models/../../x.safetensors"
    message = assert_refused(lambda: LOADER().load(climbing, "tiny.safetensors", "fp32", False), error=ConsisIDError)
    assert message.startswith("'../../x.safetensors' is not a file name inside the models/diffusion_models folder")
    message = assert_refused(lambda: LOADER().load("../tiny", "(from checkpoint)", "fp32", False), error=FileNotFoundError)
    assert message == "checkpoint '../tiny' is not in models/consisid or models/diffusers; refresh the list"
    assert folder_state(tmp_path) == before

    # what is listed works
    assert LOADER.VALIDATE_INPUTS(model=single, vae="tiny.safetensors") is True
    assert folders.file_path("vae", "tiny.safetensors") == vae_dir / "tiny.safetensors"
    (loaded,) = LOADER().load(single, "tiny.safetensors", "fp32", False)
    assert loaded.vae.config.latent_channels == 4
