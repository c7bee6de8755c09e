"""Run by test_gpu.py on a CUDA GPU inside a ComfyUI source folder: ComfyUI's model management
holding our models (the nodes' own calls, `nodes.managed`), checked where only a GPU can show it.

- resident: after a run the transformer and the VAE are in ComfyUI's loaded models, on the GPU,
  and a second run moves no weight (their storage stays where it was);
- evicted: another model's request for all the GPU's memory unloads ours instead of failing;
- partial load: loaded with a budget of a quarter of its weights, the transformer keeps the rest
  in RAM, uses less GPU memory, and gives the full load's latents (also with fp8 storage);
- Cancel and an error mid-run leave ComfyUI's accounting and the GPU memory as they were.

Argument: a tiny checkpoint folder (made by make-tiny).
"""

import gc
import sys

checkpoint_folder = sys.argv[1]
sys.argv = [sys.argv[0]]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.errors import GenerationCancelled  # noqa: E402
from consisid_pack.consisid_core.sampling import sample  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import managed  # noqa: E402

device = mm.get_torch_device()
assert device.type == "cuda", device


def allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def loaded(patcher) -> bool:
    return any(m.model is patcher for m in mm.current_loaded_models)


def inputs(model):
    width = model.config.text_embed_dim
    g = torch.Generator().manual_seed(1)
    text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
    return random_identity(model.config, seed=5), text


def run(model, owner, **options):
    """What the sampler node does: ComfyUI loads the parts, the core samples without moving them."""
    identity, text = inputs(model)
    parts = [("transformer", model.transformer), ("vae", model.vae)]
    where, move_models = managed.load(parts, owner, memory_required=2**28)
    assert not move_models
    return sample(model, identity, text, seed=3, steps=2, device=where, move_models=False, **options)


# resident between runs
baseline = allocated()
model = managed.managed(Checkpoint.open(checkpoint_folder).load_model("bf16"))
owner = model.managed
first = run(model, owner)
transformer, vae = owner.patcher("transformer", model.transformer), owner.patcher("vae", model.vae)
assert loaded(transformer) and loaded(vae)
assert all(p.device.type == "cuda" for p in model.transformer.parameters())
pointers = [p.data_ptr() for p in model.transformer.parameters()]
second = run(model, owner)
assert [p.data_ptr() for p in model.transformer.parameters()] == pointers, "the weights moved again"
assert (first - second).abs().max() <= 1e-3 * first.abs().max()
print("resident: ok")

# Cancel and an error mid-run
for failure in (GenerationCancelled("cancelled"), RuntimeError("an error mid-run")):
    held = allocated()

    def stop(step, total, latents, failure=failure):
        if step == 1:
            raise failure

    try:
        run(model, owner, callback=stop)
    except type(failure):
        pass
    assert loaded(transformer) and loaded(vae)
    assert allocated() <= held + 2**20, (allocated(), held)
print("cancel and error: ok")

# another model's request evicts ours
mm.free_memory(mm.get_total_memory(device) * 2, device)
assert not loaded(transformer) and not loaded(vae)
assert all(p.device.type == "cpu" for p in model.transformer.parameters())
assert allocated() <= baseline + 2**20
print("evicted: ok")

# partial load, fp32 and fp8 storage
for fp8 in (False, True):
    mm.unload_all_models()
    whole = managed.managed(Checkpoint.open(checkpoint_folder).load_model("bf16", fp8=fp8))
    full = run(whole, whole.managed)
    full_memory = allocated()
    mm.unload_all_models()
    part = managed.managed(Checkpoint.open(checkpoint_folder).load_model("bf16", fp8=fp8))
    patcher = part.managed.patcher("transformer", part.transformer)
    patcher.load(device, lowvram_model_memory=patcher.model_size() // 4, full_load=False)
    identity, text = inputs(part)
    vae_patcher = part.managed.patcher("vae", part.vae)
    mm.load_models_gpu([vae_patcher])
    partial = sample(part, identity, text, seed=3, steps=2, device=device, move_models=False)
    assert patcher.model.model_lowvram
    assert any(p.device.type == "cpu" for p in part.transformer.parameters())
    assert allocated() < full_memory, (allocated(), full_memory)
    assert (partial - full).abs().max() <= 1e-3 * full.abs().max(), (partial - full).abs().max()
    print(f"partial load (fp8 {fp8}): ok")
print("gpu memory: all ok")
