"""A real ComfyUI server for the native path's tests (v0.33.0, CPU, `COMFYUI_DIR`): the tiny native
checkpoint, its export and a random CogVideoX VAE in a temporary models folder; a test-only node
that gives the tiny checkpoint's saved text embeddings as CONDITIONING (core's CLIPLoader builds only
a full-size T5-XXL); the graph pieces the native tests share."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_server import running
from native_tools import vae_file, write_lora, write_q8_gguf
from workflow_tools import ROOT

CHECKPOINT = "tiny_native"
GGUF_PACK = os.environ.get("COMFYUI_GGUF_DIR")
"""A ComfyUI-GGUF checkout (city96/ComfyUI-GGUF), installed only into the test's custom_nodes; its tests are
skipped without it or without the gguf package."""
SIZE = dict(width=96, height=64, length=9)


@pytest.fixture(scope="module")
def base(tmp_path_factory, native_tiny_dir):
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.native import export, export_lora

    base = tmp_path_factory.mktemp("comfy_native")
    tiny = base / "models" / "consisid" / CHECKPOINT
    tiny.parent.mkdir(parents=True)
    tiny.symlink_to(native_tiny_dir, target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    export(tiny, base / "models" / "diffusion_models", "tiny")
    (base / "models" / "vae").mkdir()
    (base / "models" / "vae" / "cogvideox_vae.safetensors").symlink_to(vae_file(native_tiny_dir))
    transformer = Checkpoint.open(tiny).load_transformer("fp32")
    modules = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_out.0")
    write_lora(base / "models" / "loras" / "style.safetensors", transformer, modules, 1)  # for ConsisID Native LoRA
    export_lora(base / "models" / "loras" / "style.safetensors", base / "models" / "loras" / "style_comfy.safetensors")
    pack_and_inputs(base, Checkpoint.open(tiny).transformer_config)
    if GGUF_PACK:
        shutil.copytree(GGUF_PACK, base / "custom_nodes" / "ComfyUI-GGUF")
        exported = base / "models" / "diffusion_models" / "tiny_transformer.safetensors"
        write_q8_gguf(exported, base / "models" / "diffusion_models" / "tiny_q8_cogvideox.gguf", "cogvideox")
        write_q8_gguf(exported, base / "models" / "diffusion_models" / "tiny_q8_as_wan.gguf", "wan")
    return base


def pack_and_inputs(base: Path, config: dict) -> None:
    """Under `base`: the pack and the test-only text node as custom nodes; the input, user and
    output folders; in input/, the text embeddings the text node reads and an identity
    (`identity.safetensors`) for a transformer of `config`."""
    from consisid_core.identity import save_identity
    from consisid_core.tiny import random_identity

    (base / "custom_nodes" / "consisid_test_text").mkdir(parents=True)
    (base / "custom_nodes" / "consisid").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "consisid_test_text" / "__init__.py").write_text(TEXT_NODE)
    for folder in ("input", "user", "output"):
        (base / folder).mkdir()
    g = torch.Generator().manual_seed(0)
    width = config["text_embed_dim"]
    save_file({"positive": torch.randn(1, 226, width, generator=g), "negative": torch.randn(1, 226, width, generator=g)},
              base / "input" / "text.safetensors")
    save_identity(random_identity(config, 3), base / "input" / "identity.safetensors")


TEXT_NODE = '''
import os
import folder_paths
from safetensors.torch import load_file


class TestTextConditioning:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        text = load_file(os.path.join(folder_paths.get_input_directory(), "text.safetensors"))
        return ([[text["positive"], {}]], [[text["negative"], {}]])


NODE_CLASS_MAPPINGS = {"TestTextConditioning": TestTextConditioning}
'''
"""A test-only node: the tiny checkpoint's text embeddings as CONDITIONING."""


@pytest.fixture(scope="module")
def server(base):
    packs = ("consisid", "consisid_test_text") + (("ComfyUI-GGUF",) if GGUF_PACK else ())
    with running(base, ("--whitelist-custom-nodes", *packs)) as server:
        yield server


def native_head(model_nodes: dict, **options) -> dict:
    """Text (the checkpoint's T5) and identity conditioning around a MODEL made by `model_nodes`
    (`options`: Identity Conditioning's optional widgets)."""
    return model_nodes | {
        "conds": {"class_type": "TestTextConditioning", "inputs": {}},
        "identity": {"class_type": "ConsisIDLoadIdentity", "inputs": {"identity_file": "identity.safetensors"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "cogvideox_vae.safetensors"}},
        "cond": {"class_type": "ConsisIDIdentityConditioning",
                 "inputs": {"positive": ["conds", 0], "negative": ["conds", 1], "identity": ["identity", 0],
                            "vae": ["vae", 0], **SIZE, "identity_strength": 1.0, "start_percent": 0.0,
                            "end_percent": 1.0, **options}},
    }


NATIVE_LOADER = {"model": {"class_type": "ConsisIDNativeModelLoader",
                           "inputs": {"model": CHECKPOINT, "weight_dtype": "fp32"}}}
UNET_AND_FACE = {
    "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_transformer.safetensors", "weight_dtype": "default"}},
    "model": {"class_type": "ConsisIDFaceModules",
              "inputs": {"model": ["unet", 0], "face_layers": "tiny_face.safetensors"}},
}


def custom_advanced(prefix: str, model=("model", 0), sampler=None) -> dict:
    """SamplerCustomAdvanced: CFGGuider, ConsisID Noise, a sampler, BasicScheduler simple; the latent saved."""
    return {
        "guider": {"class_type": "CFGGuider",
                   "inputs": {"model": list(model), "positive": ["cond", 0], "negative": ["cond", 1], "cfg": 6.0}},
        "noise": {"class_type": "ConsisIDNoise", "inputs": {"noise_seed": 5}},
        "sampler": sampler or {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": list(model), "scheduler": "simple", "steps": 5,
                                                              "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                              "sigmas": ["sigmas", 0], "latent_image": ["cond", 2]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


def saved_latent(server, prefix: str) -> torch.Tensor:
    """The latent a SaveLatent node saved under `prefix`."""
    (path,) = sorted((server.base / "output").glob(f"{prefix}_*.latent"))
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("latent_tensor")


def assert_success(result: dict) -> None:
    """A finished prompt's history entry says success (else: the first execution error)."""
    errors = [m for kind, m in result["status"]["messages"] if kind == "execution_error"]
    assert result["status"]["status_str"] == "success", errors[0]["exception_message"] if errors else result["status"]
