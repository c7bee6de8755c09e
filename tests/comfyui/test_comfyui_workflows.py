"""Every workflow in workflows/ through a real ComfyUI server's /prompt, on the native tiny checkpoint
(`make-tiny --native`, then `export`), with each file a workflow names where the README puts it.
Skipped unless COMFYUI_DIR names a ComfyUI source folder; a workflow with native nodes is skipped on
a ComfyUI without native CogVideoX (v0.3.64) and runs on v0.33.0. The API prompt is
workflow_tools.to_api's, which tests/comfyui/test_frontend.py checks is the one the real frontend queues.

Each workflow runs as saved but for what cannot be had here, which the test swaps and prints:
- core's T5-XXL behind CLIPLoader (4.7 B parameters, too big to write in a test): each
  CLIPTextEncode becomes ConsisID Text Encode + ConsisID Text Conditioning over the tiny checkpoint's
  own T5, CLIPLoader becomes the ConsisID Model Loader whose T5 that is, and a ConsisID Text Encode
  that read CLIPLoader's CLIP reads that model instead;
- nodes of other packs (`STAND_INS`: RIFE VFI of ComfyUI-Frame-Interpolation): a core node that
  does the same to the number of frames;
and the widget values in `SIZES` (by node type, every workflow: the tiny sizes, 2 steps, fp32 on
the CPU) and `OVERRIDES` (by workflow); each save goes to a folder named after its workflow, as
ComfyUI would not run a save node again whose inputs an earlier workflow had (two workflows save
the same identity). A workflow added to workflows/ runs here as it is; declare
in `OVERRIDES` the values it needs beyond `SIZES`, in `VIDEOS` its video's (frames, height, width)
where they are not `FRAMES`, `HEIGHT`, `WIDTH`, and in `base` any file it names that is not made there.
"""

import json
import os

import pytest
import torch

from native_tools import NATIVE_COGVIDEOX, vae_file, write_lora
from comfy_server import api_prompt, frame_shape, running
from workflow_tools import (CHECKPOINT, LORAS, NATIVE_FILES, NATIVE_FP8_FILES, NATIVE_LORA, NATIVE_VAE, ROOT, WORKFLOWS,
                            import_pack)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui, pytest.mark.slow, pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")
]

FRAMES, HEIGHT, WIDTH, STEPS = 9, 32, 48, 2
"""9 frames (8k+1: decoded exactly) of 48×32, a quarter of the tiny checkpoint's own 96×64: the VAE is
of the released size, and it dominates a run here."""
SIZES = {
    "ConsisIDSampler": dict(length=FRAMES, width=WIDTH, height=HEIGHT, steps=STEPS),
    "ConsisIDExtend": dict(length=FRAMES, width=WIDTH, height=HEIGHT, steps=STEPS),
    "ConsisIDIdentityConditioning": dict(length=FRAMES, width=WIDTH, height=HEIGHT),
    "KSampler": dict(steps=STEPS),
    "BasicScheduler": dict(steps=STEPS),
    "ConsisIDModelLoader": dict(dtype="fp32"),
}
"""Widget values set in every workflow, by node type (only where the node has that input)."""
OVERRIDES: dict[str, dict[str, dict]] = {}
"""Workflow file name -> {node type: {input: value}}, over SIZES, for what one workflow needs."""
VIDEOS = {
    "consisid_upscale_interpolate.json": (2 * FRAMES, 2 * HEIGHT, 2 * WIDTH),  # upscaled ×2, frames doubled
    "consisid_long_video.json": (2 * (3 * FRAMES - 2), HEIGHT, WIDTH),  # three segments, seams once; doubled
    "consisid_native_long_video.json": (3 * FRAMES - 2, HEIGHT, WIDTH),  # three segments, seams once
}
"""Workflow file name -> (frames, height, width) of each video it saves, where not (FRAMES, HEIGHT, WIDTH)."""
T5_LOADER = {"model": CHECKPOINT, "vae": "(from checkpoint)", "dtype": "fp32", "fp8_weights": False}
"""The ConsisID Model Loader that stands in for CLIPLoader: the tiny checkpoint, for its own T5."""
SHIPPED = sorted(p.name for p in WORKFLOWS.glob("*.json"))


def _rife_stand_in(inputs: dict) -> dict:
    return {"class_type": "RepeatImageBatch", "inputs": {"image": inputs["frames"], "amount": inputs["multiplier"]}}


STAND_INS = {"RIFE VFI": _rife_stand_in}
"""Node type of another pack -> its core stand-in (API node) from the node's inputs."""


def _write_upscale_model(path) -> None:
    """A ×2 ESRGAN (the architecture of RealESRGAN_x2, 8 filters, one block) with random weights, as a
    plain state dict: core's Load Upscale Model reads it through spandrel, as the real file."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2, shuffle_factor=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def base(tmp_path_factory, native_tiny_dir):
    """The files the workflows name, where the README and docs/native.md put them: the native tiny as
    models/consisid/<CHECKPOINT>, its exports (full and fp8) in models/diffusion_models, its VAE in models/vae, the
    LoRAs (the wrapper's in diffusers layout, the native one exported), an upscale model, the photo
    and an identity in input/."""
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.cli import main
    from consisid_core.identity import save_identity
    from consisid_core.tiny import random_identity

    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    base = tmp_path_factory.mktemp("workflows")
    models = base / "models"
    tiny = models / "consisid" / CHECKPOINT
    tiny.parent.mkdir(parents=True)
    tiny.symlink_to(native_tiny_dir, target_is_directory=True)
    for folder in ("models/diffusion_models", "models/vae", "models/loras", "input", "user", "output", "custom_nodes"):
        (base / folder).mkdir()
    assert main(["export", "--model", str(tiny), "--out", str(models / "diffusion_models")]) == 0
    assert main(["export", "--model", str(tiny), "--out", str(models / "diffusion_models"), "--name", "consisid_fp8",
                 "--quant", "float8_e4m3fn"]) == 0
    assert sorted(p.name for p in (models / "diffusion_models").iterdir()) == sorted(NATIVE_FILES + NATIVE_FP8_FILES)
    (models / "vae" / NATIVE_VAE).symlink_to(vae_file(native_tiny_dir))
    transformer = Checkpoint.open(tiny).load_transformer("fp32")
    for seed, (name, _) in enumerate(LORAS):
        write_lora(models / "loras" / name, transformer, [f"transformer_blocks.{seed}.attn1.to_q"], seed, scale=0.3)
    assert main(["export", "--lora", str(models / "loras" / LORAS[0][0]), "--out", str(models / "loras")]) == 0
    assert (models / "loras" / NATIVE_LORA).is_file()
    _write_upscale_model(models / "upscale_models" / "RealESRGAN_x2.pth")
    Image.fromarray(skimage_data.astronaut()).save(base / "input" / "consisid_face.png")
    save_identity(random_identity(Checkpoint.open(tiny).transformer_config, 3), base / "input" / "identity.safetensors")
    (base / "custom_nodes" / "consisid").symlink_to(ROOT, target_is_directory=True)
    return base


@pytest.fixture(scope="module")
def server(base):
    with running(base) as server:
        yield server


def with_checkpoint_t5(prompt: dict) -> list[str]:
    """Core's T5-XXL route in `prompt` swapped, in place, for the tiny checkpoint's own T5 (see the
    module doc); what was swapped, a line each."""
    swapped = []
    for loader in [key for key, node in prompt.items() if node["class_type"] == "CLIPLoader"]:
        prompt[loader] = {"class_type": "ConsisIDModelLoader", "inputs": dict(T5_LOADER)}
        swapped.append(f"CLIPLoader {loader} -> ConsisID Model Loader ({CHECKPOINT}, for its T5)")
        for key, node in list(prompt.items()):
            inputs = node["inputs"]
            if inputs.get("clip") != [loader, 0]:
                continue
            if node["class_type"] == "ConsisIDTextEncode":
                inputs["model"] = inputs.pop("clip")
                swapped.append(f"ConsisID Text Encode {key}: the checkpoint's T5 in place of CLIPLoader's")
            elif node["class_type"] == "CLIPTextEncode":
                prompt[f"{key}_t5"] = {"class_type": "ConsisIDTextEncode",
                                       "inputs": {"prompt": inputs["text"], "negative_prompt": "", "model": [loader, 0]}}
                prompt[key] = {"class_type": "ConsisIDTextConditioning", "inputs": {"text": [f"{key}_t5", 0]}}
                swapped.append(f"CLIPTextEncode {key} -> ConsisID Text Encode {key}_t5 + ConsisID Text Conditioning {key}")
            else:
                raise AssertionError(f"{node['class_type']} {key} reads CLIPLoader's CLIP: give the test a swap for it")
    return swapped


def tiny(name: str, prompt: dict) -> tuple[dict, list[str]]:
    """The workflow's API prompt as this test runs it, and what it swapped (see the module doc)."""
    swapped = with_checkpoint_t5(prompt)
    for key, node in list(prompt.items()):
        if node["class_type"] in STAND_INS:
            prompt[key] = STAND_INS[node["class_type"]](node["inputs"])
            swapped.append(f"{node['class_type']} {key} -> {prompt[key]['class_type']} (another pack's node)")
    values = {kind: dict(SIZES.get(kind, {}), **OVERRIDES.get(name, {}).get(kind, {}))
              for kind in set(SIZES) | set(OVERRIDES.get(name, {}))}
    for node in prompt.values():
        inputs = node["inputs"]
        inputs.update({k: v for k, v in values.get(node["class_type"], {}).items() if k in inputs})
        if isinstance(inputs.get("filename_prefix"), str):
            inputs["filename_prefix"] = f"{name.removesuffix('.json')}/{inputs['filename_prefix']}"
    return prompt, swapped


def _native_nodes() -> set[str]:
    """Our node types that need native CogVideoX (those of nodes/native)."""
    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    return {name for name, cls in NODE_CLASS_MAPPINGS.items() if cls.__module__.startswith("consisid_pack.nodes.native")}


def _outputs(server, suffix: str) -> set:
    return set((server.base / "output").rglob(f"*{suffix}"))


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_runs_through_prompt_and_saves_its_video(server, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    needs = _native_nodes() & {node["type"] for node in workflow["nodes"]}
    if needs and not NATIVE_COGVIDEOX:
        pytest.skip(f"{name} uses {', '.join(sorted(needs))}: this ComfyUI has no native CogVideoX")
    prompt, swapped = tiny(name, api_prompt(server, name))
    print(f"{name}: " + ("; ".join(swapped) if swapped else "every node as saved") + " (sizes and steps: SIZES)")
    videos, identities = _outputs(server, ".mp4"), _outputs(server, ".safetensors")
    result = server.run(prompt)
    errors = [m for kind, m in result["status"]["messages"] if kind == "execution_error"]
    assert result["status"]["status_str"] == "success", (
        f"{errors[0]['node_type']} {errors[0]['node_id']}: {errors[0]['exception_message']}" if errors else result["status"])
    saved = sorted(_outputs(server, ".mp4") - videos)
    assert len(saved) == sum(n["class_type"] == "SaveVideo" for n in prompt.values()) > 0
    for video in saved:
        assert frame_shape(video) == VIDEOS.get(name, (FRAMES, HEIGHT, WIDTH)), video.name
    saves_identity = sum(n["class_type"] == "ConsisIDSaveIdentity" for n in prompt.values())
    assert len(_outputs(server, ".safetensors") - identities) == saves_identity


def test_the_t5_swap_replaces_only_the_t5_nodes():
    """CLIPLoader and CLIPTextEncode go; every other node keeps its type, inputs and links."""
    from workflow_tools import all_specs, to_api

    specs = all_specs()
    for name in SHIPPED:
        saved = to_api(json.loads((WORKFLOWS / name).read_text()), specs)
        prompt = json.loads(json.dumps(saved))
        with_checkpoint_t5(prompt)
        t5 = {key for key, node in saved.items() if node["class_type"] in ("CLIPLoader", "CLIPTextEncode")}
        for key in set(saved) - t5:
            expected = json.loads(json.dumps(saved[key]))
            if "clip" in expected["inputs"]:  # ConsisID Text Encode on CLIPLoader's CLIP: the same link, as `model`
                expected["inputs"]["model"] = expected["inputs"].pop("clip")
            assert prompt[key] == expected, (name, key)
        assert {prompt[key]["class_type"] for key in t5} <= {"ConsisIDModelLoader", "ConsisIDTextConditioning"}
        assert {prompt[key]["class_type"] for key in set(prompt) - set(saved)} <= {"ConsisIDTextEncode"}
