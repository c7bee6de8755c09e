"""Run by test_comfyui_dynamic_vram.py inside a ComfyUI v0.33 source folder, on the CPU: the native
ConsisID MODEL under dynamic VRAM (`dynamic_vram_tools`: forced on as ComfyUI's main.py turns it on
with an NVIDIA GPU; core's dynamic patcher kept on the CPU; what that leaves untested is said there).

- dynamic VRAM off (this process, before it is forced on): the MODEL and its face layers' patcher
  are classic patchers; the latents are the reference for what follows;
- on: every fence probe passes; the MODEL and the face layers' patcher are dynamic patchers; the
  dynamic load switches every face layer to cast per call (they are core's castable kind), and the
  latents are those with dynamic VRAM off;
- a full unload (what Unload Models and eviction do) goes through and puts every weight back: the
  face layers' weights, their extractor's own parameters included, are the ones in RAM again; the
  next run loads them again and gives the same latents;
- fp8 weights (Load Diffusion Model's fp8_e4m3fn): the face layers in the dtype the MODEL computes
  in; dynamic VRAM stores weights in fp8 only as it pages them into VRAM, so on the CPU the latents
  are the fp32 MODEL's.

Argument: a tiny native checkpoint folder (make-tiny --native).
"""

import sys

checkpoint_folder = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
from dynamic_vram_tools import force_on, load_library  # noqa: E402

load_library()
import comfy.model_management as mm  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from native_tools import guided_sample  # noqa: E402
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.nodes import fence  # noqa: E402
from consisid_pack.nodes.native.comfy_parts import face_patcher  # noqa: E402
from consisid_pack.nodes.native.nodes import native_model  # noqa: E402

FRAMES, HEIGHT, WIDTH = 9, 64, 96


def sample(model) -> torch.Tensor:
    return guided_sample(model, Checkpoint.open(checkpoint_folder).transformer_config, (FRAMES, HEIGHT, WIDTH), 3)


def face_weights(model) -> dict[str, torch.Tensor]:
    return dict(face_patcher(model).model.named_parameters())


off_model = native_model(checkpoint_folder, torch.float32)
assert not off_model.is_dynamic() and not face_patcher(off_model).is_dynamic()
off = sample(off_model)
off_fp8 = sample(native_model(checkpoint_folder, torch.float8_e4m3fn))
mm.unload_all_models()
del off_model

DynamicOnCPU = force_on()
fence.check.cache_clear()
assert not any(fence.check().values()), fence.check()
print("fence: every probe passes")

model = native_model(checkpoint_folder, torch.float32)
face = face_patcher(model)
assert isinstance(model, DynamicOnCPU) and isinstance(face, DynamicOnCPU), (type(model), type(face))
leaves = [m for m in face.model.modules() if next(m.children(), None) is None]
layers = [m for m in leaves if next(m.parameters(), None) is not None]
assert layers and all(hasattr(m, "comfy_cast_weights") and not m.comfy_cast_weights for m in layers)
in_ram = face_weights(model)
on = sample(model)
assert all(m.comfy_cast_weights for m in layers), [type(m).__name__ for m in layers if not m.comfy_cast_weights]
difference = (on - off).abs().max().item()
print(f"dynamic VRAM on against off: max |diff| {difference}")
assert difference <= 1e-6, difference

mm.unload_all_models()
assert not mm.current_loaded_models
back = face_weights(model)
assert back.keys() == in_ram.keys() and all(back[k] is in_ram[k] or torch.equal(back[k], in_ram[k]) for k in back)
assert all(p.device.type == "cpu" for p in back.values())
again = sample(model)
assert torch.equal(again, on)
print("full unload: weights back, the next run the same")
mm.unload_all_models()

fp8 = native_model(checkpoint_folder, torch.float8_e4m3fn)  # Load Diffusion Model's fp8_e4m3fn
assert fp8.model.get_dtype() == torch.float8_e4m3fn
assert {p.dtype for p in face_patcher(fp8).model.parameters()} == {fp8.model.get_dtype_inference()}
# dynamic VRAM stores a layer's weights in fp8 as it pages them into VRAM (the VBAR); on the CPU they stay
# as the file has them (fp32), so the MODEL computes as the fp32 one, and so must the face layers
assert (off_fp8 - off).abs().max() > 1e-3  # with dynamic VRAM off, fp8 storage does change the numbers
difference = (sample(fp8) - on).abs().max().item()
print(f"fp8 weights, dynamic VRAM on against fp32: max |diff| {difference}")
assert difference == 0.0, difference
mm.unload_all_models()
print("native dynamic vram: all ok")
