"""LoRA in a real ComfyUI (skipped unless COMFYUI_DIR is set; see tests/comfyui/test_comfyui.py): the LoRA
workflow with two stacked LoRAs from models/loras, and a graph where the loader's model feeds a
branch with the LoRAs and one without: ComfyUI patches the weights for one branch and puts them
back for the other, so each gives what the core gives (checked against runs in this process)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_server import api_prompt, frame_shape, at_tiny_size, videos, base, running  # noqa: F401 - base is a fixture
from workflow_tools import CHECKPOINT, LORAS

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]
PROMPT = "a woman smiling"
STEPS = 2


def _lora_tensors(transformer, modules, seed: int, prefix: str) -> dict:
    """A rank-2 LoRA of `modules` in diffusers layout (lora_A / lora_B), random but small."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        out_features, in_features = transformer.get_submodule(name).weight.shape
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, in_features, generator=g) * 0.3
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_features, 2, generator=g) * 0.3
    return tensors


@pytest.fixture(scope="module")
def lora_base(base):  # noqa: F811 - test_comfyui's fixture, for this module
    """The models of test_comfyui's `base` plus the workflow's two LoRAs in models/loras: one of
    the attention layers (transformer. keys), one reaching the face layers (ComfyUI's
    diffusion_model. keys)."""
    from consisid_core.checkpoint import Checkpoint

    transformer = Checkpoint.open(base / "models" / "consisid" / CHECKPOINT).load_transformer("fp32")
    attention = [f"transformer_blocks.{i}.attn1.{p}" for i in range(2) for p in ("to_q", "to_v", "to_out.0")]
    face = ["perceiver_cross_attention.0.to_q", "local_facial_extractor.layers.0.0.to_kv",
            "transformer_blocks.1.ff.net.2"]
    folder = base / "models" / "loras"
    folder.mkdir(exist_ok=True)
    (style, _), (subject, _) = LORAS
    save_file(_lora_tensors(transformer, attention, 1, "transformer."), folder / style)
    save_file(_lora_tensors(transformer, face, 2, "diffusion_model."), folder / subject)
    return base


@pytest.fixture(scope="module")
def server(lora_base):
    with running(lora_base) as server:
        yield server


def test_lora_workflow_runs_and_saves_its_video(server):
    before = set(videos(server))
    prompt = at_tiny_size(api_prompt(server, "consisid_lora.json"), steps=STEPS)
    assert [n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "ConsisIDLoRA"] == [
        name for name, _ in LORAS
    ]
    result = server.run(prompt)
    assert result["status"]["status_str"] == "success", result["status"]
    (video,) = set(videos(server)) - before
    assert frame_shape(video) == (9, 64, 96)


def _branches(seed: int) -> dict:
    """Loader -> LoRA -> LoRA -> Sampler -> Decode -> SaveImage, and Loader -> Sampler -> Decode ->
    SaveImage, sharing the loader, the identity and the text."""
    prompt = {
        "loader": {"class_type": "ConsisIDModelLoader",
                   "inputs": {"model": CHECKPOINT, "vae": "(from checkpoint)", "dtype": "fp32", "fp8_weights": False}},
        "identity": {"class_type": "ConsisIDLoadIdentity", "inputs": {"identity_file": "identity.safetensors"}},
        "text": {"class_type": "ConsisIDTextEncode",
                 "inputs": {"model": ["loader", 0], "prompt": PROMPT, "negative_prompt": ""}},
    }
    model = ["loader", 0]
    for i, (name, strength) in enumerate(LORAS):
        prompt[f"lora{i}"] = {"class_type": "ConsisIDLoRA",
                              "inputs": {"model": model, "lora_name": name, "strength": strength}}
        model = [f"lora{i}", 0]
    for branch, branch_model in (("lora", model), ("plain", ["loader", 0])):
        prompt[f"{branch}_sampler"] = {"class_type": "ConsisIDSampler", "inputs": {
            "model": branch_model, "identity": ["identity", 0], "text": ["text", 0], "seed": seed, "steps": STEPS,
            "cfg": 6.0, "dynamic_cfg": False, "scheduler": "dpm", "length": 9, "width": 96, "height": 64,
            "identity_strength": 1.0}}
        prompt[f"{branch}_decode"] = {"class_type": "ConsisIDVAEDecode", "inputs": {
            "model": branch_model, "latent": [f"{branch}_sampler", 0], "tiling": False, "tile_height": 240,
            "tile_width": 360, "overlap_height": 40, "overlap_width": 72, "slicing": False}}
        prompt[f"{branch}_save"] = {"class_type": "SaveImage", "inputs": {
            "images": [f"{branch}_decode", 0], "filename_prefix": f"lora_test/{branch}_{seed}"}}
    return prompt


def _saved(server, result: dict, node: str) -> np.ndarray:
    images = result["outputs"][node]["images"]
    folder = server.base / "output"
    return np.stack([np.asarray(Image.open(folder / i["subfolder"] / i["filename"])) for i in images])


def _core(folder, seed: int, loras: bool) -> np.ndarray:
    """The same run by the core in this process, written to 8 bits as SaveImage does."""
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.identity import load_identity
    from consisid_core.lora import read_lora, with_loras
    from consisid_core.sampling import generate

    model = Checkpoint.open(folder / "models" / "consisid" / CHECKPOINT).load_model("fp32")
    if loras:
        model = with_loras(model, [(read_lora(folder / "models" / "loras" / name), s) for name, s in LORAS])
    identity = load_identity(folder / "input" / "identity.safetensors")
    frames = generate(model, identity, PROMPT, "", steps=STEPS, seed=seed, length=9, height=64, width=96)
    return np.clip(255.0 * frames.numpy(), 0, 255).astype(np.uint8)


def test_a_branch_without_the_loras_gets_the_plain_model(server):
    """Two prompts, so that whichever branch ComfyUI runs first, the plain one runs once right after
    the LoRA one has patched the shared transformer."""
    for seed in (31, 32):
        result = server.run(_branches(seed))
        assert result["status"]["status_str"] == "success", json.dumps(result["status"])[-2000:]
        styled, plain = _saved(server, result, "lora_save"), _saved(server, result, "plain_save")
        assert styled.shape == plain.shape == (9, 64, 96, 3)
        expected_plain, expected_styled = _core(server.base, seed, False), _core(server.base, seed, True)
        assert np.abs(plain.astype(int) - expected_plain).max() <= 1
        assert np.abs(styled.astype(int) - expected_styled).max() <= 1
        assert np.abs(styled.astype(int) - plain).max() > 20  # the LoRAs show


def test_with_sequential_offload_the_sampler_merges_the_loras(server):
    """Streaming the transformer's layers, the core merges the LoRAs (ComfyUI's patcher is unloaded)."""
    prompt = _branches(33)
    prompt["performance"] = {"class_type": "ConsisIDPerformance", "inputs": {
        "compile": False, "offload": "sequential", "step_cache": 0.0, "attention": "sdpa"}}
    for branch in ("lora", "plain"):
        prompt[f"{branch}_sampler"]["inputs"]["performance"] = ["performance", 0]
    result = server.run(prompt)
    assert result["status"]["status_str"] == "success", json.dumps(result["status"])[-2000:]
    assert np.abs(_saved(server, result, "lora_save").astype(int) - _core(server.base, 33, True)).max() <= 1
    assert np.abs(_saved(server, result, "plain_save").astype(int) - _core(server.base, 33, False)).max() <= 1
