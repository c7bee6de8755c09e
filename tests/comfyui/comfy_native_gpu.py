"""Run by test_gpu.py on a CUDA GPU inside a ComfyUI source folder with native CogVideoX (v0.33):
the native ConsisID MODEL in ComfyUI's own loading, where only a GPU can show it.

- whole load: the latents are finite (the face layers' own parameters, held by a module with
  children, reach the GPU: ComfyUI moves only leaf layers unless it loads with no budget), and
  after ComfyUI unloads the model no weight of it, face layers included, is left on the GPU (with
  dynamic VRAM, which moves such parameters to the GPU and leaves them there, the pack's unload
  callback brings them back);
- partial load (`classic`: dynamic VRAM off, a budget of one byte forced, as --novram): every face
  layer stays in RAM and is cast per call, and the latents are the whole load's;
- dynamic VRAM (`dynamic`, v0.33's default on NVIDIA, turned on as main.py does): the MODEL and its
  face layers' patcher are dynamic patchers, every face layer is cast per call from RAM through
  the VBAR, and a second run gives the first's latents;
- fp8 weights (Load Diffusion Model's fp8_e4m3fn): the face layers in the compute dtype, the
  video close to the full-precision one.

Arguments: a tiny native checkpoint folder (`make-tiny --native`), then `classic` or
`dynamic`.
"""

import gc
import sys

checkpoint_folder, mode = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0]] + (["--disable-dynamic-vram"] if mode == "classic" else [])
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
from dynamic_vram_tools import load_library, turn_on_gpu  # noqa: E402

if mode == "dynamic":
    load_library()
import comfy.model_management as mm  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

if mode == "dynamic":
    turn_on_gpu()
import_pack()
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes.native.comfy_parts import ReferenceNoise, face_patcher  # noqa: E402
from consisid_pack.nodes.native.nodes import identity_conditioned, native_model  # noqa: E402

assert mm.get_torch_device().type == "cuda", mm.get_torch_device()
FRAMES, HEIGHT, WIDTH = 9, 64, 96


def conditioning():
    config = Checkpoint.open(checkpoint_folder).transformer_config
    g = torch.Generator().manual_seed(1)
    width = config["text_embed_dim"]
    positive, negative = ([[torch.randn(1, 226, width, generator=g), {}]] for _ in range(2))
    first = torch.randn(1, 16, 1, HEIGHT // 8, WIDTH // 8, generator=g)
    return identity_conditioned(positive, negative, random_identity(config, seed=3), first)


def sample(model) -> torch.Tensor:
    positive, negative = conditioning()
    latent = torch.zeros(1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    noise = ReferenceNoise(5).generate_noise({"samples": latent})
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, seed=5, disable_pbar=True)
    assert torch.isfinite(out).all()
    return out.float().cpu()


def face_layers(model):
    face = face_patcher(model).model
    return [m for m in face.modules() if next(m.children(), None) is None and next(m.parameters(), None) is not None]


def close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-2) -> None:
    error = (a - b).abs().max().item() / b.abs().max().item()
    print(f"{what}: max |Δ| / max = {error:.2e}")
    assert error <= rel, what


def on_gpu_after_unload(model) -> list[str]:
    mm.unload_all_models()
    gc.collect()
    return [n for n, p in model.model.named_parameters() if p.device.type == "cuda"] + [
        f"face {n}" for n, p in face_patcher(model).model.named_parameters() if p.device.type == "cuda"]


whole_model = native_model(checkpoint_folder, torch.float32)
assert whole_model.is_dynamic() == face_patcher(whole_model).is_dynamic() == (mode == "dynamic")
whole = sample(whole_model)
left = on_gpu_after_unload(whole_model)
assert not left, left[:5]

if mode == "classic":
    model = native_model(checkpoint_folder, torch.float32)
    real_load = mm.LoadedModel.model_load

    def partial(loaded, lowvram_model_memory=0, force_patch_weights=False):
        ours = loaded.model in (model, face_patcher(model))
        budget = 1 if ours else lowvram_model_memory  # as --novram: every castable layer in RAM
        return real_load(loaded, budget, force_patch_weights=force_patch_weights)

    mm.LoadedModel.model_load = partial
    try:
        partial_latents = sample(model)
        assert model.model.model_lowvram
        in_ram = [m for m in face_layers(model) if m.weight.device.type == "cpu" and m.comfy_cast_weights]
        print(f"partial load: {len(in_ram)} of {len(face_layers(model))} face layers left in RAM, cast per call")
        assert len(in_ram) == len(face_layers(model))
    finally:
        mm.LoadedModel.model_load = real_load
        mm.unload_all_models()
    close(partial_latents, whole, "partial load against whole")
else:
    again = sample(whole_model)
    layers = face_layers(whole_model)
    paged = [m for m in layers if hasattr(m, "_v")]  # staged in the VBAR; the tiny ones (<16 KB) are loaded
    print(f"dynamic VRAM: {len(paged)} of {len(layers)} face layers paged through the VBAR")
    assert all(m.comfy_cast_weights for m in layers)
    assert all(m.weight.device.type == ("cpu" if hasattr(m, "_v") else "cuda") for m in layers)
    close(again, whole, "dynamic VRAM, second run against first", rel=1e-5)
    assert not on_gpu_after_unload(whole_model)

fp8_model = native_model(checkpoint_folder, torch.float8_e4m3fn)
assert {p.dtype for m in face_layers(fp8_model) for p in m.parameters()} == {fp8_model.model.get_dtype_inference()}
close(sample(fp8_model), whole, "fp8 weights against fp32", rel=0.2)
mm.unload_all_models()
print("native gpu: all ok")
