"""The native path in a real ComfyUI server (v0.33.0, CPU): API prompts through /prompt with core
KSampler, SamplerCustomAdvanced, CFGGuider, UNETLoader, LoraLoaderModelOnly, CFGZeroStar, VAE Loader,
VAE Decode, Create Video and Save Video (and ConsisID Native LoRA and Native VAE Decode beside them)
on a tiny ConsisID checkpoint.

The checkpoint is the native tiny (`make-tiny --native`): its VAE is of the released CogVideoX
architecture with random weights, the one core's VAE Loader builds. Core's CLIPLoader builds only a
full-size T5-XXL, so the prompts' CONDITIONING comes from a test-only node in the temporary
custom_nodes folder that reads two saved embeddings (the shipped workflows run with the checkpoint's
T5 instead: test_comfyui_workflows.py)."""

import pytest
import torch

from native_server import (GGUF_PACK, NATIVE_LOADER, UNET_AND_FACE, assert_success, base, custom_advanced,  # noqa: F401
                           native_head, saved_latent, server)
from native_tools import NEEDS_NATIVE

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, NEEDS_NATIVE]


def test_unetloader_plus_face_layers_is_the_native_loaders_model(server):
    assert_success(server.run(native_head(NATIVE_LOADER) | custom_advanced("native/loader")))
    assert_success(server.run(native_head(UNET_AND_FACE) | custom_advanced("native/unet")))
    loader, unet = saved_latent(server, "native/loader"), saved_latent(server, "native/unet")
    assert loader.shape == (1, 16, 3, 8, 12) and torch.isfinite(loader).all()
    assert (loader - unet).abs().max().item() <= 1e-5  # one model loaded two ways: fp32 rounding of the CPU's kernels


def test_core_lora_loader_changes_the_latents(server):
    lora = {"lora": {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["model", 0], "lora_name": "style_comfy.safetensors", "strength_model": 1.0}}}
    assert_success(server.run(native_head(NATIVE_LOADER) | lora | custom_advanced("native/lora", model=("lora", 0))))
    assert_success(server.run(native_head(NATIVE_LOADER) | custom_advanced("native/plain")))
    assert (saved_latent(server, "native/lora") - saved_latent(server, "native/plain")).abs().max() > 1e-2


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
    seeded = native_head(NATIVE_LOADER, first_frame_seed=5)  # the first frame sampled for ConsisID Noise's seed
    assert_success(server.run(seeded | core | custom_advanced("native/core_lora", model=("lora", 0))))
    assert_success(server.run(seeded | node | custom_advanced("native/node_lora", model=("lora", 0)) | decode))
    assert_success(server.run(native_head(NATIVE_LOADER) | node | custom_advanced("native/mean_lora", model=("lora", 0))))
    assert torch.equal(saved_latent(server, "native/node_lora"), saved_latent(server, "native/core_lora"))
    assert not torch.equal(saved_latent(server, "native/node_lora"), saved_latent(server, "native/mean_lora"))
    assert list((server.base / "output" / "native").glob("decoded*.mp4"))


def test_ksampler_euler_with_cfg_zero_star_and_dynamic_cfg_decodes_and_saves_a_video(server):
    prompt = native_head(NATIVE_LOADER) | {
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
    assert_success(server.run(prompt))
    assert list((server.base / "output" / "native").glob("video*.mp4"))


def test_dpm_sampler_node_runs_in_sampler_custom_advanced(server):
    sampler = {"class_type": "ConsisIDDPMSampler", "inputs": {"noise_seed": 5}}
    assert_success(server.run(native_head(NATIVE_LOADER) | custom_advanced("native/dpm", sampler=sampler)))
    assert torch.isfinite(saved_latent(server, "native/dpm")).all()


def test_a_face_layers_file_that_is_not_one_fails_in_one_line(server):
    prompt = {
        "model": {"class_type": "ConsisIDFaceModules",
                  "inputs": {"model": ["unet", 0], "face_layers": "tiny_transformer.safetensors"}},
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
        "model": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["unet", 0], "face_layers": "tiny_face.safetensors"}},
    } | native_head({}) | custom_advanced("native/gguf")
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
        "model": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["unet", 0], "face_layers": "tiny_face.safetensors"}},
    } | native_head({}) | custom_advanced("native/gguf_wan")
    assert_success(server.run(prompt))
    assert_success(server.run(native_head(NATIVE_LOADER) | custom_advanced("native/full")))
    quantized, full = saved_latent(server, "native/gguf_wan"), saved_latent(server, "native/full")
    relative = ((quantized - full).norm() / full.norm()).item()
    print(f"Q8_0 GGUF vs full precision: relative L2 {relative:.3e}")
    assert 0 < relative < 0.15  # measured 7.1e-2 on the tiny random model at CFG 6
