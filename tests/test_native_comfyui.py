"""The native path in a real ComfyUI server (v0.33.0, CPU): API prompts through /prompt with core
KSampler, SamplerCustomAdvanced, CFGGuider, UNETLoader, LoraLoaderModelOnly, CFGZeroStar, VAE Loader,
VAE Decode, Create Video and Save Video (and ConsisID Native LoRA and Native VAE Decode beside them)
on a tiny ConsisID checkpoint.

The checkpoint is the native tiny (`make-tiny --native`): its VAE is of the released CogVideoX
architecture with random weights, the one core's VAE Loader builds. Core's CLIPLoader builds only a
full-size T5-XXL, so the prompts' CONDITIONING comes from a test-only node in the temporary
custom_nodes folder that reads two saved embeddings (the shipped workflows run with the checkpoint's
T5 instead: tests/test_comfyui_workflows.py)."""

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from native_tools import NEEDS_NATIVE, vae_file, write_lora, write_q8_gguf
from test_comfyui import running
from workflow_tools import ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, NEEDS_NATIVE]

CHECKPOINT = "tiny_native"
GGUF_PACK = os.environ.get("COMFYUI_GGUF_DIR")
"""A ComfyUI-GGUF checkout (city96/ComfyUI-GGUF), installed only into the test's custom_nodes; its tests are
skipped without it or without the gguf package."""
SIZE = dict(width=96, height=64, length=9)


@pytest.fixture(scope="module")
def base(tmp_path_factory, native_tiny_dir):
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.identity import save_identity
    from consisid_core.native import export, export_lora
    from consisid_core.tiny import random_identity

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
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "consisid").symlink_to(ROOT, target_is_directory=True)
    if GGUF_PACK:
        shutil.copytree(GGUF_PACK, base / "custom_nodes" / "ComfyUI-GGUF")
        exported = base / "models" / "diffusion_models" / "tiny_transformer.safetensors"
        write_q8_gguf(exported, base / "models" / "diffusion_models" / "tiny_q8_cogvideox.gguf", "cogvideox")
        write_q8_gguf(exported, base / "models" / "diffusion_models" / "tiny_q8_as_wan.gguf", "wan")
    (base / "custom_nodes" / "consisid_test_text").mkdir()
    (base / "custom_nodes" / "consisid_test_text" / "__init__.py").write_text(TEXT_NODE)
    for folder in ("input", "user", "output"):
        (base / folder).mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"positive": torch.randn(1, 226, 32, generator=g), "negative": torch.randn(1, 226, 32, generator=g)},
              base / "input" / "text.safetensors")
    save_identity(random_identity(Checkpoint.open(tiny).transformer_config, 3), base / "input" / "identity.safetensors")
    return base


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


def _head(model_nodes: dict, **options) -> dict:
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
              "inputs": {"model": ["unet", 0], "face_modules": "tiny_face.safetensors"}},
}


def _custom_advanced(prefix: str, model=("model", 0), sampler=None) -> dict:
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


def _latent(server, prefix: str) -> torch.Tensor:
    (path,) = sorted((server.base / "output").glob(f"{prefix}_*.latent"))
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("latent_tensor")


def _ok(result: dict) -> None:
    errors = [m for kind, m in result["status"]["messages"] if kind == "execution_error"]
    assert result["status"]["status_str"] == "success", errors[0]["exception_message"] if errors else result["status"]


def test_unetloader_plus_face_layers_is_the_native_loaders_model(server):
    _ok(server.run(_head(NATIVE_LOADER) | _custom_advanced("native/loader")))
    _ok(server.run(_head(UNET_AND_FACE) | _custom_advanced("native/unet")))
    loader, unet = _latent(server, "native/loader"), _latent(server, "native/unet")
    assert loader.shape == (1, 16, 3, 8, 12) and torch.isfinite(loader).all()
    assert (loader - unet).abs().max().item() <= 1e-5  # one model loaded two ways: fp32 rounding of the CPU's kernels


def test_core_lora_loader_changes_the_latents(server):
    lora = {"lora": {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["model", 0], "lora_name": "style_comfy.safetensors", "strength_model": 1.0}}}
    _ok(server.run(_head(NATIVE_LOADER) | lora | _custom_advanced("native/lora", model=("lora", 0))))
    _ok(server.run(_head(NATIVE_LOADER) | _custom_advanced("native/plain")))
    assert (_latent(server, "native/lora") - _latent(server, "native/plain")).abs().max() > 1e-2


def test_native_lora_node_is_core_loras_export_a_seeded_first_frame_and_native_vae_decode_a_video(server):
    core = {"lora": {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["model", 0], "lora_name": "style_comfy.safetensors", "strength_model": 1.0}}}
    node = {"lora": {"class_type": "ConsisIDNativeLoRA",
                     "inputs": {"model": ["model", 0], "lora_name": "style.safetensors", "strength_model": 1.0}}}
    decode = {
        "decode": {"class_type": "ConsisIDNativeVAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 8.0}},
        "savevideo": {"class_type": "SaveVideo", "inputs": {"video": ["video", 0], "filename_prefix": "native/decoded",
                                                            "format": "mp4", "codec": "h264"}},
    }
    seeded = _head(NATIVE_LOADER, first_frame_seed=5)  # the first frame sampled for ConsisID Noise's seed
    _ok(server.run(seeded | core | _custom_advanced("native/core_lora", model=("lora", 0))))
    _ok(server.run(seeded | node | _custom_advanced("native/node_lora", model=("lora", 0)) | decode))
    _ok(server.run(_head(NATIVE_LOADER) | node | _custom_advanced("native/mean_lora", model=("lora", 0))))
    assert torch.equal(_latent(server, "native/node_lora"), _latent(server, "native/core_lora"))
    assert not torch.equal(_latent(server, "native/node_lora"), _latent(server, "native/mean_lora"))
    assert list((server.base / "output" / "native").glob("decoded*.mp4"))


def test_ksampler_euler_with_cfg_zero_star_and_dynamic_cfg_decodes_and_saves_a_video(server):
    prompt = _head(NATIVE_LOADER) | {
        "zero": {"class_type": "CFGZeroStar", "inputs": {"model": ["model", 0]}},
        "dynamic": {"class_type": "ConsisIDDynamicCFG", "inputs": {"model": ["zero", 0]}},
        "ksampler": {"class_type": "KSampler",
                     "inputs": {"model": ["dynamic", 0], "seed": 1, "steps": 3, "cfg": 6.0, "sampler_name": "euler",
                                "scheduler": "simple", "positive": ["cond", 0], "negative": ["cond", 1],
                                "latent_image": ["cond", 2], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["vae", 0]}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 8.0}},
        "savevideo": {"class_type": "SaveVideo",
                      "inputs": {"video": ["video", 0], "filename_prefix": "native/video", "format": "mp4", "codec": "h264"}},
    }
    _ok(server.run(prompt))
    assert list((server.base / "output" / "native").glob("video*.mp4"))


def test_dpm_sampler_node_runs_in_sampler_custom_advanced(server):
    sampler = {"class_type": "ConsisIDDPMSampler", "inputs": {"noise_seed": 5}}
    _ok(server.run(_head(NATIVE_LOADER) | _custom_advanced("native/dpm", sampler=sampler)))
    assert torch.isfinite(_latent(server, "native/dpm")).all()


def test_a_face_layers_file_that_is_not_one_fails_in_one_line(server):
    prompt = {
        "model": {"class_type": "ConsisIDFaceModules",
                  "inputs": {"model": ["unet", 0], "face_modules": "tiny_transformer.safetensors"}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_transformer.safetensors", "weight_dtype": "default"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 2,
                                                              "denoise": 1.0}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["sigmas", 0]}},
    }
    status, answer = server.post("/prompt", {"prompt": prompt})
    assert status == 200, answer
    result = server.wait(answer["prompt_id"])
    assert result["status"]["status_str"] == "error"
    message = next(m for kind, m in result["status"]["messages"] if kind == "execution_error")["exception_message"]
    assert "not a ConsisID face-layers file" in message and "\n" not in message.strip()


@pytest.mark.skipif(not GGUF_PACK, reason="COMFYUI_GGUF_DIR is not set")
def test_gguf_q8_of_the_exported_transformer_through_unet_loader_gguf(server):
    """Where ComfyUI-GGUF stands: a Q8_0 GGUF of the exported transformer, named for what it is
    (general.architecture 'cogvideox'), is refused by UnetLoaderGGUF: its loader accepts only the
    architectures in its IMG_ARCH_LIST, which has no CogVideoX. Recorded here so that a ComfyUI-GGUF
    that adds it shows up as this test failing."""
    prompt = {
        "unet": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_q8_cogvideox.gguf"}},
        "model": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["unet", 0], "face_modules": "tiny_face.safetensors"}},
    } | _head({}) | _custom_advanced("native/gguf")
    status, answer = server.post("/prompt", {"prompt": prompt})
    assert status == 200, answer
    result = server.wait(answer["prompt_id"])
    errors = [m for kind, m in result["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "UnetLoaderGGUF", result["status"]
    assert "Unexpected architecture type in GGUF file: 'cogvideox'" in errors[0]["exception_message"]


@pytest.mark.skipif(not GGUF_PACK, reason="COMFYUI_GGUF_DIR is not set")
def test_past_that_gate_the_gguf_model_samples_with_identity(server):
    """The same Q8_0 file with its architecture field set to one ComfyUI-GGUF lists ('wan'): its
    loader hands the weights to core's model detection, which finds CogVideoX by the keys; ConsisID
    Face Layers, the identity and sampling then work on ComfyUI-GGUF's quantized layers, close to the
    full-precision model (Q8_0 rounding: 7 % relative on this tiny random model at CFG 6). So the architecture list is the one thing in the way."""
    prompt = {
        "unet": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_q8_as_wan.gguf"}},
        "model": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["unet", 0], "face_modules": "tiny_face.safetensors"}},
    } | _head({}) | _custom_advanced("native/gguf_wan")
    _ok(server.run(prompt))
    _ok(server.run(_head(NATIVE_LOADER) | _custom_advanced("native/full")))
    quantized, full = _latent(server, "native/gguf_wan"), _latent(server, "native/full")
    relative = ((quantized - full).norm() / full.norm()).item()
    print(f"Q8_0 GGUF vs full precision: relative L2 {relative:.3e}")
    assert 0 < relative < 0.15  # measured 7.1e-2 on the tiny random model at CFG 6
