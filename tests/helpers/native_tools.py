"""Shared by the native-path tests: ComfyUI imported in-process on the CPU, whether it has native
CogVideoX, and test files made from the native tiny checkpoint (`make-tiny --native`, conftest's
`native_tiny_dir`): random LoRAs of its transformer, GGUFs of its export."""

import os
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
NATIVE_COGVIDEOX = bool(COMFYUI_DIR) and (Path(COMFYUI_DIR) / "comfy" / "ldm" / "cogvideo" / "model.py").is_file()
"""Whether the ComfyUI in COMFYUI_DIR has native CogVideoX (v0.21 and later: v0.33.0, not v0.3.64)."""
NEEDS_NATIVE = pytest.mark.skipif(not NATIVE_COGVIDEOX, reason="COMFYUI_DIR is not set, or its ComfyUI has no native CogVideoX")


def vae_file(checkpoint: Path) -> Path:
    """The checkpoint's VAE: in the native tiny, one of the released architecture (the one core's VAE
    Loader builds), random weights, diffusers key names, float16, scaling factor 0.7 as ConsisID's."""
    return checkpoint / "vae" / "diffusion_pytorch_model.safetensors"


def write_lora(path: Path, transformer, modules, seed: int, prefix: str = "transformer.", scale: float = 0.5) -> Path:
    """A rank-2 LoRA of `modules` (names in `transformer`) in diffusers layout (lora_A / lora_B), random."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        out_features, in_features = transformer.get_submodule(name).weight.shape
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, in_features, generator=g) * scale
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_features, 2, generator=g) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


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


def guided_sample(model, config, size: tuple[int, int, int], steps: int):
    """`model` (a native MODEL) sampled as the real-ComfyUI scripts sample it: core's CFGGuider at
    CFG 6 over random text and a random first frame (seed 1) and a random identity (seed 3) of
    `config`, the empty video latent of `size` (frames, height, width), the reference's noise for
    seed 5, `ddim` on `steps` simple sigmas. Call it after `import_pack()`."""
    import comfy.samplers
    import torch
    from consisid_pack.consisid_core.tiny import random_identity
    from consisid_pack.nodes.native.comfy_parts import ReferenceNoise
    from consisid_pack.nodes.native.nodes import identity_conditioned

    frames, height, width = size
    g = torch.Generator().manual_seed(1)
    positive, negative = ([[torch.randn(1, 226, config["text_embed_dim"], generator=g), {}]] for _ in range(2))
    first = torch.randn(1, 16, 1, height // 8, width // 8, generator=g)
    positive, negative = identity_conditioned(positive, negative, random_identity(config, seed=3), first)
    latent = torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    noise = ReferenceNoise(5).generate_noise({"samples": latent})
    return guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, seed=5, disable_pbar=True)
