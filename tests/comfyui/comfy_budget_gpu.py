"""Run by test_gpu.py on a CUDA GPU inside a ComfyUI v0.33 source folder: both paths at ConsisID's
real size (ConsisID-preview's transformer architecture, 12.3 GB in bf16, random weights) on a 12 GB
card, with dynamic VRAM on (`dynamic`, as main.py turns it on) or off (`classic`).

A larger card stands in for a 12 GB one: `--reserve-vram` (its memory less 12 GiB), which classic
loading leaves free and dynamic VRAM keeps as headroom; torch's allocator capped at 12 GiB; and the
device's memory in use polled through the run (every 2 ms, so shorter peaks can be missed).

- the wrapper (ConsisID Sampler's own code): the transformer does not fit, so it loads partly (its
  classic patcher, in both modes), samples, and the device stays within 12 GiB;
- the native MODEL (core's CogVideoX from the same weights, with the face layers), beside the
  wrapper's transformer still loaded: in core's dynamic patcher with its face layers' patcher
  beside it (`dynamic`) or loaded partly (`classic`), it samples within 12 GiB;
- the wrapper again, beside the native MODEL: `load_models_gpu` makes room, within 12 GiB;
- after Unload Models no weight of either is left on the GPU.

Arguments: a tiny native checkpoint folder (its VAE and scheduler; tests/native_tools), a scratch
folder (the real-size transformer is written there, 12.3 GB), then `classic` or `dynamic`.
"""

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

folder, scratch, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
BUDGET = 12 * 2**30
# the card's memory without torch: as in ComfyUI's main.py, comfy-aimdo starts before torch is imported
query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "--id=0"]
total = int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0]) * 2**20
sys.argv = [sys.argv[0], "--reserve-vram", f"{(total - BUDGET) / 2**30:.2f}"]
sys.argv += ["--disable-dynamic-vram"] if mode == "classic" else []
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
from dynamic_vram_tools import load_library, turn_on_gpu  # noqa: E402

if mode == "dynamic":
    load_library()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

if mode == "dynamic":
    turn_on_gpu()
import_pack()
from native_tools import guided_sample  # noqa: E402
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.single_file import RELEASED_TRANSFORMER_CONFIG  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import managed  # noqa: E402
from consisid_pack.nodes.native.comfy_parts import face_patcher  # noqa: E402
from consisid_pack.nodes.native.nodes import native_model  # noqa: E402
from consisid_pack.nodes.sampling import ConsisIDSampler  # noqa: E402

torch.cuda.set_per_process_memory_fraction(BUDGET / total)
free_at_start = torch.cuda.mem_get_info()[0]
FRAMES, HEIGHT, WIDTH = 9, 160, 240


class Peak:
    """The device's memory in use beyond what it was at the start, polled in a thread."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, free_at_start - torch.cuda.mem_get_info()[0])
            time.sleep(0.002)

    def __exit__(self, *_):
        self._stop = True
        self._thread.join()
        print(f"{mode}: peak {self.peak / 2**30:.2f} GiB of the 12 GiB budget")
        assert self.peak <= BUDGET, self.peak


def real_transformer():
    from diffusers import ConsisIDTransformer3DModel

    with torch.device("meta"):
        transformer = ConsisIDTransformer3DModel.from_config(RELEASED_TRANSFORMER_CONFIG)
    transformer = transformer.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    for parameter in transformer.parameters():
        parameter.data.normal_(0, 0.02, generator=g)
    return transformer


def wrapper(model) -> None:
    g = torch.Generator().manual_seed(1)
    width = RELEASED_TRANSFORMER_CONFIG["text_embed_dim"]
    text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
    with Peak():
        latents = ConsisIDSampler().sample(
            model, random_identity(model.config, seed=5), text, seed=3, steps=2, cfg=6.0, dynamic_cfg=False,
            scheduler="ddim", length=FRAMES, width=WIDTH, height=HEIGHT, identity_strength=1.0)[0]["samples"]
    patcher = model.managed.held(model.transformer)
    assert type(patcher) is comfy.model_patcher.ModelPatcher and patcher.model.model_lowvram
    assert torch.isfinite(latents).all()
    print(f"wrapper: {patcher.loaded_size() / 2**30:.2f} of {patcher.model_size() / 2**30:.2f} GiB on the GPU")


def native(file: Path):
    model = native_model(str(file), torch.bfloat16)
    assert model.is_dynamic() == face_patcher(model).is_dynamic() == (mode == "dynamic")
    with Peak():
        out = guided_sample(model, RELEASED_TRANSFORMER_CONFIG, (FRAMES, HEIGHT, WIDTH), 2)
    assert torch.isfinite(out).all()
    print(f"native: {model.loaded_size() / 2**30:.2f} of {model.model_size() / 2**30:.2f} GiB on the GPU")
    assert model.loaded_size() < model.model_size()
    return model


def on_gpu(*modules: torch.nn.Module) -> list[str]:
    return [n for m in modules for n, p in m.named_parameters() if p.device.type == "cuda"]


tiny = Checkpoint.open(folder).load_model("bf16")
wrapper_model = managed.managed(dataclasses.replace(tiny, transformer=real_transformer()))
wrapper(wrapper_model)
scratch.mkdir(parents=True, exist_ok=True)
weights = {k: v.contiguous() for k, v in wrapper_model.transformer.state_dict().items()}
save_file(weights, scratch / "transformer.safetensors")
del weights
native_patcher = native(scratch / "transformer.safetensors")  # beside the wrapper's transformer, still loaded
wrapper(wrapper_model)  # and the wrapper again beside the native MODEL: load_models_gpu makes room
mm.unload_all_models()
left = on_gpu(wrapper_model.transformer, native_patcher.model, face_patcher(native_patcher).model)
assert not left, left[:5]
print("12 GB budget: all ok")
