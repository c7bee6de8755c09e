"""The native path's plain math (consisid_core/native.py, reference.py, face_layers.py), against diffusers:
no ComfyUI needed."""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from consisid_core import native, reference
from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main
from consisid_core.errors import CheckpointError, ConsisIDError
from consisid_core.face_layers import face_layers
from consisid_core.sampling import _pipeline, first_frame, make_scheduler
from consisid_core.single_file import RELEASED_SCHEDULER_CONFIG
from consisid_core.tiny import random_identity


@pytest.fixture(scope="module")
def folder(native_tiny_dir):
    return native_tiny_dir


def test_reference_noise_is_what_the_pipeline_draws(tiny_model):
    identity = random_identity(tiny_model.config, seed=1)
    pipe = _pipeline(tiny_model.vae, tiny_model.transformer, make_scheduler(tiny_model, "ddim"))
    image = pipe.video_processor.preprocess(first_frame(None, identity), height=64, width=96).float()
    latents, _ = pipe.prepare_latents(image, 1, 4, 9, 64, 96, torch.float32, torch.device("cpu"),
                                      torch.Generator("cpu").manual_seed(5), None)
    assert torch.equal(reference.reference_noise(5, 4, 3, 8, 12), latents.permute(0, 2, 1, 3, 4))
    assert not torch.equal(reference.reference_noise(6, 4, 3, 8, 12), latents.permute(0, 2, 1, 3, 4))


def test_first_frame_pixels_are_the_pipelines_preprocessing(tiny_model):
    identity = random_identity(tiny_model.config, seed=1)
    pipe = _pipeline(tiny_model.vae)
    frame = first_frame(None, identity)
    expected = pipe.video_processor.preprocess(frame, height=64, width=96)
    pixels = reference.first_frame_pixels(frame, 64, 96)
    assert pixels.shape == (1, 64, 96, 3)
    assert torch.allclose(pixels * 2 - 1, expected.permute(0, 2, 3, 1), atol=1e-6)


def test_flow_sigmas_are_the_schedule_in_flow_coordinates():
    from diffusers import CogVideoXDDIMScheduler

    sigmas = reference.flow_sigmas()
    a = CogVideoXDDIMScheduler.from_config(
        {k: v for k, v in RELEASED_SCHEDULER_CONFIG.items() if not k.startswith("_")}).alphas_cumprod.double()
    assert a[-1] == 0 and sigmas[-1] == 1 and bool((sigmas[1:] > sigmas[:-1]).all())
    # σ / (1 - σ) is k-diffusion's sigma √((1-ᾱ)/ᾱ); the input scale turns the flow latent back into x_t
    k_sigma = ((1 - a[:-1]) / a[:-1]).sqrt()
    assert torch.allclose(sigmas[:-1] / (1 - sigmas[:-1]), k_sigma, rtol=1e-9)
    assert torch.allclose(reference.flow_input_scale(sigmas), a.sqrt() + (1 - a).sqrt(), rtol=1e-9)


def test_dynamic_guidance_is_the_pipelines_formula():
    # ConsisIDPipeline: 1 + g * ((1 - cos(pi * ((steps - t) / steps) ** 5.0)) / 2), t the timestep
    for t in (999, 500, 19):
        expected = 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2)
        assert reference.dynamic_guidance(6.0, t, 50) == expected


def test_key_map_covers_every_transformer_key_both_ways(folder):
    weights, _ = native.source_weights(folder)
    core, face = native.split_weights(weights)
    assert len(core) + len(face) == len(weights)
    assert "blocks.0.q.weight" in core and "time_embedding_linear_1.weight" in core and "blocks.1.ff_out.bias" in core
    assert not any(k.startswith("transformer_blocks") for k in core)
    assert all(native.comfy_key(native.diffusers_key(k)) == k for k in core)


def test_model_parts_are_the_transformer_in_comfyui_layout_and_the_face_layers(folder):
    """What `export` writes and the native loader loads, from one reading of the checkpoint."""
    checkpoint = Checkpoint.open(folder)
    weights, config = native.source_weights(folder)
    core, face = native.split_weights(weights)
    parts = native.model_parts(folder)
    assert parts.core.keys() == core.keys() and all(torch.equal(parts.core[k], core[k]) for k in core)
    assert parts.face.keys() == face.keys() and all(torch.equal(parts.face[k], face[k]) for k in face)
    assert parts.config == config and parts.scheduler == checkpoint.scheduler_config
    assert (parts.latent_channels, parts.scaling_factor) == (checkpoint.vae_config["latent_channels"],
                                                            checkpoint.vae_config["scaling_factor"])
    half = native.model_parts(folder, dtype=torch.bfloat16, quant="float8_e4m3fn")
    assert {v.dtype for v in half.face.values()} == {torch.bfloat16}
    assert half.core["blocks.1.q.weight"].dtype == torch.float8_e4m3fn and "blocks.1.q.comfy_quant" in half.core


def test_model_parts_stop_when_cancelled(folder):
    calls = []

    def cancel():
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        native.model_parts(folder, cancel)
    assert len(calls) == 3


def test_model_parts_refuse_what_the_native_path_cannot_take(tiny_kps_dir, folder, tmp_path):
    says = "this checkpoint has is_kps on (keypoint latents): the native path takes is_kps off only"
    with pytest.raises(ConsisIDError, match=re.escape(says)):
        native.model_parts(tiny_kps_dir)
    epsilon = tmp_path / "epsilon"
    shutil.copytree(folder, epsilon)
    config = epsilon / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "epsilon"}))
    with pytest.raises(CheckpointError, match="prediction_type is 'epsilon'; ConsisID predicts v"):
        native.model_parts(epsilon)
    for source in (tiny_kps_dir, epsilon):
        assert main(["export", "--model", str(source), "--out", str(tmp_path / "out"), "--name", "x"]) == 2
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_writes_the_transformer_and_face_files(folder, tmp_path, capsys):
    assert main(["export", "--model", str(folder), "--out", str(tmp_path), "--name", "tiny"]) == 0
    transformer, face = (tmp_path / "tiny_transformer.safetensors"), (tmp_path / "tiny_face.safetensors")
    assert capsys.readouterr().out.split() == [str(transformer), str(face)]
    with safe_open(transformer, framework="pt") as f:
        assert "blocks.0.norm1.linear.weight" in f.keys() and not any("facial" in k for k in f.keys())
    weights, info = native.read_face_file(face)
    config = Checkpoint.open(folder).transformer_config
    assert info["latent_channels"] == 16 and info["scaling_factor"] == 0.7
    assert info["config"]["cross_attn_interval"] == config["cross_attn_interval"]
    modules = face_layers(weights, info["config"])
    source, _ = native.source_weights(folder)
    assert torch.equal(modules.state_dict()["local_facial_extractor.latents"], source["local_facial_extractor.latents"])
    assert main(["export", "--model", str(folder), "--out", str(tmp_path), "--name", "tiny"]) == 2  # no overwrite


def test_export_refuses_what_is_not_a_face_file(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a ConsisID face-layers file"):
        native.read_face_file(tmp_path / "other.safetensors")


def test_face_layers_are_diffusers_own(folder):
    """The face layers' forward is diffusers' (same classes): extractor then cross-attention as
    ConsisIDTransformer3DModel computes them."""
    transformer = Checkpoint.open(folder).load_transformer("fp32")
    weights, config = native.source_weights(folder)
    _, face = native.split_weights(weights)
    modules = face_layers(face, config)
    identity = random_identity(config, seed=2)
    tokens = modules.face_tokens(identity.id_cond, list(identity.id_vit_hidden))
    with torch.no_grad():
        expected = transformer.local_facial_extractor(identity.id_cond, list(identity.id_vit_hidden))
        assert torch.equal(tokens, expected)
        hidden = torch.randn(1, 10, 64)
        assert torch.equal(modules.cross_attention(0, tokens, hidden),
                           transformer.perceiver_cross_attention[0](expected, hidden))
    assert [modules.after_block(i) for i in range(2)] == [0, 1]


def test_the_native_workflows_are_the_graphs_docs_native_md_describes():
    from workflow_tools import WORKFLOWS, all_specs, to_api

    def types(name):
        return [n["type"] for n in json.loads((WORKFLOWS / name).read_text())["nodes"]]

    basic = types("consisid_native.json")
    assert basic[:3] == ["CLIPLoader", "CLIPTextEncode", "CLIPTextEncode"]
    assert basic[-5:] == ["ConsisIDIdentityConditioning", "KSampler", "VAEDecode", "CreateVideo", "SaveVideo"]
    api = to_api(json.loads((WORKFLOWS / "consisid_native.json").read_text()), all_specs())
    by_type = {node["class_type"]: node["inputs"] for node in api.values()}
    assert by_type["CLIPLoader"]["type"] == "cogvideox"
    assert (by_type["KSampler"]["sampler_name"], by_type["KSampler"]["scheduler"], by_type["KSampler"]["steps"]) == (
        "ddim", "simple", 50)
    lora = types("consisid_native_lora.json")
    assert lora.index("UNETLoader") < lora.index("ConsisIDFaceModules") < lora.index("LoraLoaderModelOnly")
    assert {"SamplerCustomAdvanced", "ConsisIDSeed", "CFGGuider"} <= set(lora)
    assert lora[-3:] == ["ConsisIDNativeVAEDecode", "CreateVideo", "SaveVideo"]
