"""Run by test_comfyui.py inside a ComfyUI source folder: ComfyUI's partial load of our transformer.

The transformer made castable and held by a ModelPatcher, loaded with a budget smaller than the
model (what ComfyUI does when it does not fit the free VRAM): most layers stay where they are and
are cast per call (`comfy.ops`). The latents must equal those of today's path (the core moving the
plain model), in fp32 and with fp8 weight storage. On the CPU the "GPU" and RAM are one device, so
this proves the numbers and that the layers really took the cast-per-call path; the speed and the
memory need a GPU (tests/core/test_gpu.py). The checkpoint's T5, partly loaded as Text Encode asks for
it, must give the embeddings of the T5 as it is.

With `dynamic`, dynamic VRAM is forced on first (`dynamic_vram_tools`, as ComfyUI v0.33 turns it on
with an NVIDIA GPU): `comfy.ops` then builds its layers with `weight = None`, every fence probe must
pass, the pack says in one line that its transformer and T5 stay in the classic patcher, and the
partial loads must give the same numbers.

Arguments: a tiny checkpoint folder (made by make-tiny), then `classic` (default) or `dynamic`.
"""

import logging
import sys

checkpoint_folder = sys.argv[1]
dynamic = sys.argv[2:] == ["dynamic"]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
if dynamic:
    from dynamic_vram_tools import force_on, load_library

    load_library()
    force_on()
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import torch  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.sampling import sample  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings, encode_text, load_text_encoder  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import fence, managed  # noqa: E402

said: list[str] = []


class Said(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())


logging.getLogger("consisid_pack.nodes").addHandler(Said())
logging.getLogger("consisid_pack.nodes").setLevel(logging.INFO)
assert not dynamic or not any(fence.check().values()), fence.check()  # v0.33: every probe, the native ones too
assert managed.dynamic_vram() == dynamic

casts = []
real_cast = comfy.ops.cast_bias_weight


def counting_cast(*args, **kwargs):
    casts.append(True)
    return real_cast(*args, **kwargs)


comfy.ops.cast_bias_weight = counting_cast  # counts the per-call casts of ComfyUI's castable layers


def latents(fp8: bool, partial: bool) -> torch.Tensor:
    model = Checkpoint.open(checkpoint_folder).load_model("fp32", fp8=fp8)
    identity = random_identity(model.config, seed=5)
    width = model.config.text_embed_dim
    g = torch.Generator().manual_seed(1)
    text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
    move_models = True
    if partial:
        owner = managed.managed(model).managed
        patcher = owner.patcher("transformer", model.transformer)
        budget = patcher.model_size() // 4  # a quarter of the weights "fit"; the rest is cast per call
        patcher.load(torch.device("cpu"), lowvram_model_memory=budget, full_load=False)
        lowvram = sum(1 for m in model.transformer.modules() if getattr(m, "comfy_cast_weights", False))
        assert patcher.model.model_lowvram and lowvram > 10, (patcher.model.model_lowvram, lowvram)
        move_models = False
    casts.clear()
    out = sample(model, identity, text, seed=3, steps=2, device="cpu", move_models=move_models)
    assert (len(casts) > 0) == partial, len(casts)
    return out


for fp8 in (False, True):
    plain, partial = latents(fp8, partial=False), latents(fp8, partial=True)
    difference = (plain - partial).abs().max().item()
    print(f"fp8 {fp8}: max |diff| {difference}")
    assert difference == 0.0, difference


def t5(partial: bool) -> torch.Tensor:
    """The checkpoint's T5 (its tied embedding one castable layer): ComfyUI's partial load as Text Encode
    asks for it, against the T5 as it is."""
    encoder = load_text_encoder(Checkpoint.open(checkpoint_folder), "fp32")
    if partial:
        patcher = managed.Managed().patcher("text_encoder", encoder.model)
        patcher.load(torch.device("cpu"), lowvram_model_memory=patcher.model_size() // 4, full_load=False)
        assert patcher.model.model_lowvram
    casts.clear()
    text = encode_text(encoder, "a woman smiles", "blurry", "cpu", move_models=not partial)
    assert (len(casts) > 0) == partial, len(casts)
    return torch.cat([text.positive, text.negative])


difference = (t5(False) - t5(True)).abs().max().item()
print(f"t5: max |diff| {difference}")
assert difference == 0.0, difference
classic_beside = [line for line in said if "dynamic VRAM is on" in line]
assert len(classic_beside) == dynamic, said
print(*classic_beside, sep="\n")
print("partial load: equal")
