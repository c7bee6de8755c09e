"""ConsisID in ComfyUI core's quantized formats, in a real ComfyUI v0.33.0 on the CPU: each format
`export --quant` writes is what core's own quantizer (comfy-kitchen) writes, byte for byte; core's Load
Diffusion Model (UNETLoader) loads each file and KSampler samples it with ConsisID Face Layers and
the identity; ConsisID Native Model Loader's quantize-on-load gives the same latents as the exported
file. (The low-VRAM workflow runs through /prompt in tests/comfyui/test_comfyui_workflows.py.)

The checkpoint is bench.quant's tiny one (4 heads of 64, a 256-wide time embedding: what core's
CogVideoX detection reads and every format's block size divides); the text is a test-only node that
reads two saved embeddings (as in test_native_comfyui.py)."""

import pytest
import torch

from bench.quant import TINY
from consisid_core import native, quant
from native_tools import NEEDS_NATIVE, import_comfyui, vae_file
from comfy_server import running
from native_server import assert_success, pack_and_inputs, saved_latent
from workflow_tools import CHECKPOINT, NATIVE_VAE

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, NEEDS_NATIVE]

FORMATS = list(quant.FORMATS)
SIZE = dict(width=96, height=64, length=9)


@pytest.fixture(scope="module")
def base(tmp_path_factory, native_tiny_dir):
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.tiny import TINY_T5, random_components, save_components

    base = tmp_path_factory.mktemp("comfy_quant")
    folder = save_components(random_components(TINY.transformer, TINY.vae, TINY_T5, 0),
                             base / "models" / "consisid" / CHECKPOINT)
    models = base / "models" / "diffusion_models"
    models.mkdir(parents=True)
    native.export(folder, models, "full")
    for name in FORMATS:
        native.export(folder, models, name, quant=name)
    (base / "models" / "vae").mkdir()
    (base / "models" / "vae" / NATIVE_VAE).symlink_to(vae_file(native_tiny_dir))  # core's VAE Loader: released size
    pack_and_inputs(base, Checkpoint.open(folder).transformer_config)
    return base


@pytest.fixture(scope="module")
def server(base):
    with running(base, ("--whitelist-custom-nodes", "consisid", "consisid_test_text")) as server:
        yield server


def _sampled(model_nodes: dict, prefix: str) -> dict:
    """`model_nodes` (ending in "model") with the identity, core KSampler (ddim, simple, 2 steps) and the latent saved."""
    return model_nodes | {
        "conds": {"class_type": "TestTextConditioning", "inputs": {}},
        "identity": {"class_type": "ConsisIDLoadIdentity", "inputs": {"identity_file": "identity.safetensors"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": NATIVE_VAE}},
        "cond": {"class_type": "ConsisIDIdentityConditioning",
                 "inputs": {"positive": ["conds", 0], "negative": ["conds", 1], "identity": ["identity", 0],
                            "vae": ["vae", 0], **SIZE, "identity_strength": 1.0, "start_percent": 0.0,
                            "end_percent": 1.0}},
        "ksampler": {"class_type": "KSampler",
                     "inputs": {"model": ["model", 0], "seed": 4, "steps": 2, "cfg": 6.0, "sampler_name": "ddim",
                                "scheduler": "simple", "positive": ["cond", 0], "negative": ["cond", 1],
                                "latent_image": ["cond", 2], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ksampler", 0], "filename_prefix": prefix}},
    }


def _unet(name: str) -> dict:
    return {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{name}_transformer.safetensors",
                                                            "weight_dtype": "default"}},
            "model": {"class_type": "ConsisIDFaceModules",
                      "inputs": {"model": ["unet", 0], "face_layers": f"{name}_face.safetensors"}}}


def _loader(quantize: str) -> dict:
    return {"model": {"class_type": "ConsisIDNativeModelLoader",
                      "inputs": {"model": CHECKPOINT, "weight_dtype": "default", "quantize": quantize}}}


def test_each_format_is_what_cores_own_quantizer_writes():
    """Our math against comfy-kitchen's quantizers as core calls them (fp8 with its recomputed scale,
    asym_w4a8_int8 in its symmetric form without a codebook), on a weight with zeros and a tiny value."""
    import_comfyui()
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor
    from comfy_kitchen.tensor.w4a8_int8 import quantize_w4a8_int8_weight

    g = torch.Generator().manual_seed(0)
    for shape in ((256, 512), (96, 768)):
        w = torch.randn(*shape, generator=g) * 0.02
        w[0, :3] = torch.tensor([0.0, -0.0, 1e-9])
        for name in FORMATS:
            ours = quant.quantize({"blocks.1.q.weight": w}, name)
            if name == "asym_w4a8_int8":
                packed, s_rel, s_channel, _, _ = quantize_w4a8_int8_weight(w, codebook=False)
                theirs = {"weight": packed, "weight_s_rel": s_rel, "weight_s_channel": s_channel}
            else:
                options = {"scale": "recalculate"} if name.startswith("float8") else {}
                theirs = QuantizedTensor.from_float(w, QUANT_ALGOS[name]["comfy_tensor_layout"], **options).state_dict("weight")
            assert {k.removeprefix("blocks.1.q.") for k in ours} == set(theirs) | {"comfy_quant"}, name
            for key, value in theirs.items():
                mine = ours[f"blocks.1.q.{key}"]
                assert mine.shape == value.shape, (name, key)
                assert torch.equal(mine.view(torch.uint8), value.view(torch.uint8)) if value.element_size() == 1 else \
                    torch.equal(mine, value), (name, key)


def test_unet_loader_loads_each_format_and_ksampler_samples_it(server):
    assert_success(server.run(_sampled(_unet("full"), "quant/full")))
    full = saved_latent(server, "quant/full")
    for name in FORMATS:
        assert_success(server.run(_sampled(_unet(name), f"quant/{name}")))
        latent = saved_latent(server, f"quant/{name}")
        relative = ((latent - full).norm() / full.norm()).item()
        print(f"{name}: relative L2 from full precision {relative:.2e}")
        assert torch.isfinite(latent).all() and 0 < relative < (0.02 if quant.FORMATS[name].bits == 8 else 0.05), name
    log = (server.base / "server.log").read_text()
    assert "Using mixed precision operations" in log


def test_quantize_on_load_holds_the_exported_files_weights(base):
    """ConsisID Native Model Loader's quantize-on-load and core's Load Diffusion Model on the exported
    file: the same MODEL, tensor for tensor (quantized layers as core stores them)."""
    import_comfyui()
    import comfy.sd

    from consisid_pack.nodes.native.nodes import native_model

    models = base / "models" / "diffusion_models"
    for name in FORMATS:
        loaded = native_model(base / "models" / "consisid" / CHECKPOINT, None, name).model.diffusion_model
        exported = comfy.sd.load_diffusion_model(str(models / f"{name}_transformer.safetensors")).model.diffusion_model
        ours, theirs = loaded.state_dict(), exported.state_dict()
        assert ours.keys() == theirs.keys() and "blocks.1.q.comfy_quant" in ours, name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.parametrize("name", ["float8_e4m3fn", "nvfp4"])
def test_quantize_on_load_samples_as_the_exported_file(server, name):
    """Within the last bits of the CPU's fp32 kernels, as the full-precision model loaded these two ways
    (test_native_comfyui.py). The formats that quantize the activations too (int8_tensorwise,
    convrot_w4a4, asym_w4a8_int8) carry such a bit across a rounding step now and then, so they are
    compared weight for weight (above)."""
    assert_success(server.run(_sampled(_loader(name), f"quant/loader_{name}")))
    assert_success(server.run(_sampled(_unet(name), f"quant/file_{name}")))
    loader, exported = saved_latent(server, f"quant/loader_{name}"), saved_latent(server, f"quant/file_{name}")
    print(f"{name}: max |quantize-on-load - exported file| {(loader - exported).abs().max().item():.2e}")
    assert (loader - exported).abs().max().item() <= 1e-4


def test_a_quantize_value_that_is_not_a_format_fails_comfyuis_validation(server):
    status, answer = server.post("/prompt", {"prompt": _sampled(_loader("q4_k"), "quant/bad")})
    assert status == 400, answer
    (error,) = answer["node_errors"]["model"]["errors"]  # ComfyUI's own check of a combo's value
    assert error["type"] == "value_not_in_list" and "quantize: 'q4_k' not in" in error["details"], error
