"""Run on a machine with two or more CUDA GPUs, inside a ComfyUI source folder with MultiGPU CFG
Split (v0.33): the native ConsisID MODEL under core's MultiGPU CFG Split, what one CPU cannot show.

For each loader (ConsisID Native Model Loader, and core Load Diffusion Model + ConsisID Face Layers):
- the node gives the MODEL a deep clone on the second GPU, with its own face layers there (their
  parameters on that GPU after sampling, the primary's on the first);
- sampling splits the guided batch between the GPUs and gives the one-GPU latents (fp32, within 1e-4);
- ConsisID Step Cache on top of it samples, and after ComfyUI unloads the models no weight is left
  on either GPU.
Prints one line per check and the seconds of each run; exits non-zero at the first failure.

Argument: a tiny native checkpoint folder (make-tiny --native), and its export
(`python -m consisid_core export --model FOLDER --out DIR --name tiny`) as DIR.
"""

import sys
import time

checkpoint_folder, exported = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0]]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from native_tools import guided_sample  # noqa: E402
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.face_layers import face_layers  # noqa: E402
from consisid_pack.consisid_core.native import read_face_file  # noqa: E402
from consisid_pack.nodes.native.comfy_parts import face_patcher, with_face_layers, with_step_cache  # noqa: E402
from consisid_pack.nodes.native.nodes import native_model  # noqa: E402

assert torch.cuda.device_count() >= 2, f"{torch.cuda.device_count()} GPU(s): this check needs two"
FRAMES, HEIGHT, WIDTH = 9, 64, 96


def sample(model) -> torch.Tensor:
    started = time.perf_counter()
    out = guided_sample(model, Checkpoint.open(checkpoint_folder).transformer_config, (FRAMES, HEIGHT, WIDTH), 4)
    print(f"  sampled in {time.perf_counter() - started:.2f} s")
    assert torch.isfinite(out).all()
    return out.float().cpu()


def unet_and_face():
    core = comfy.sd.load_diffusion_model(f"{exported}/tiny_transformer.safetensors", model_options={"dtype": torch.float32})
    weights, info = read_face_file(f"{exported}/tiny_face.safetensors")
    return with_face_layers(core, face_layers(weights, info["config"]), info["latent_channels"],
                             info["scaling_factor"], info["scheduler"])


for name, load in (("native loader", lambda: native_model(checkpoint_folder, torch.float32)), ("unet + face", unet_and_face)):
    print(name)
    model = load()
    one_gpu = sample(model)
    (split,) = MultiGPUCFGSplitNode.execute(model, 2).result
    (clone,) = split.get_additional_models_with_key("multigpu")
    assert clone.load_device != split.load_device, (clone.load_device, split.load_device)
    face, own = (face_patcher(m).model.module for m in (split, clone))
    assert own is not face
    two_gpus = sample(split)
    devices = {next(face.parameters()).device, next(own.parameters()).device}
    print(f"  face layers on {sorted(map(str, devices))}")
    assert len(devices) == 2, devices
    diff = (two_gpus - one_gpu).abs().max().item()
    print(f"  max |two GPUs - one GPU| {diff:.1e}")
    assert diff <= 1e-4
    assert torch.isfinite(sample(with_step_cache(split, 0.2))).all()
    del model, split, clone, face, own
    mm.unload_all_models()
    mm.soft_empty_cache()
    for index in range(2):
        left = torch.cuda.memory_allocated(index)
        print(f"  cuda:{index} holds {left} bytes after the unload")
        assert left < 1 << 20, left
print("multigpu: every check passed")
