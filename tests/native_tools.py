"""Shared by the native-path tests: a tiny ConsisID checkpoint whose transformer core ComfyUI's
CogVideoX detection reads right (64-wide heads, 32 input and 16 output channels, as the released
one; the default tiny has 32-wide heads and 4 channels, which detection cannot know), and
ComfyUI imported in-process on the CPU."""

import os
import sys
from pathlib import Path

import pytest

from consisid_core.tiny import TINY_T5, TINY_TRANSFORMER, TINY_VAE, random_components, save_components

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
NATIVE_COGVIDEOX = bool(COMFYUI_DIR) and (Path(COMFYUI_DIR) / "comfy" / "ldm" / "cogvideo" / "model.py").is_file()
"""Whether the ComfyUI in COMFYUI_DIR has native CogVideoX (v0.21 and later: v0.33.0, not v0.3.64)."""
NEEDS_NATIVE = pytest.mark.skipif(not NATIVE_COGVIDEOX, reason="COMFYUI_DIR is not set, or its ComfyUI has no native CogVideoX")
NATIVE_TRANSFORMER = {**TINY_TRANSFORMER, "num_attention_heads": 1, "attention_head_dim": 64, "in_channels": 32,
                      "out_channels": 16}
NATIVE_VAE = {**TINY_VAE, "latent_channels": 16}


def make_native_tiny(directory: Path, seed: int = 0) -> Path:
    """A tiny ConsisID checkpoint folder (no face_encoder/: identities here are random ones)."""
    return save_components(random_components(NATIVE_TRANSFORMER, NATIVE_VAE, TINY_T5, seed), directory)


def import_comfyui(pytorch_attention: bool = False):
    """ComfyUI from COMFYUI_DIR in this process, on the CPU (with `pytorch_attention`, as
    --use-pytorch-cross-attention), then the pack (which then sees it)."""
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = pytorch_attention
    import comfy.model_management  # noqa: F401
    import comfy.samplers  # noqa: F401

    from workflow_tools import import_pack

    parts = sys.modules.get("consisid_pack.nodes.native.comfy_parts")
    if parts is not None and not parts.AVAILABLE:  # imported by an earlier test without ComfyUI: again, with it
        for name in [m for m in sys.modules if m == "consisid_pack" or m.startswith("consisid_pack.")]:
            del sys.modules[name]
    return import_pack()


def write_cogvideox_vae(path: Path, seed: int = 0) -> Path:
    """A CogVideoX VAE of the released architecture (core's VAE Loader builds only that one) with
    random weights, diffusers key names, fp16 (about 430 MB), scaling factor 0.7 as ConsisID's."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(scaling_factor=0.7)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, path)
    return path


def write_q8_gguf(source: Path, target: Path, arch: str) -> Path:
    """A GGUF of a safetensors transformer as ComfyUI-GGUF's tools/convert.py (plus llama.cpp's
    quantizer) writes one: 2-D weights whose rows are whole 32-value blocks in Q8_0, the rest F32,
    `general.architecture` set to `arch`."""
    import gguf
    from safetensors.torch import load_file

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, tensor in load_file(str(source)).items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file(path=str(target))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
