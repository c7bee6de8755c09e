"""Run by test_comfyui_fence.py inside a ComfyUI source folder: the ComfyUI fence (`nodes/fence.py`).

Every assumption the pack makes about ComfyUI's internals is broken on purpose, one at a time, as a
ComfyUI release could break it. Each time the fence must name what differs in one log line and the
feature must fall back (the same latents) or be refused with one line; where the fence is what
saves the run, the same call without it is shown to fail ("without the fence: ...").

Argument: a tiny checkpoint folder (made by make-tiny).
"""

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

checkpoint_folder = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.lora import read_lora, with_loras  # noqa: E402
from consisid_pack.consisid_core.sampling import sample  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import fence, host  # noqa: E402
from consisid_pack.nodes.sampling import ConsisIDSampler  # noqa: E402

DELETED = object()
lines: list[str] = []


class Lines(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())


logging.getLogger("consisid_pack.nodes.fence").addHandler(Lines())


@contextlib.contextmanager
def broken(owner, name: str, value):
    """`owner.name` replaced by `value` (or deleted) for the block; the fence looks again."""
    had, old = hasattr(owner, name), getattr(owner, name, None)
    if value is DELETED:
        delattr(owner, name)
    else:
        setattr(owner, name, value)
    fence.check.cache_clear()
    lines.clear()
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        elif hasattr(owner, name):
            delattr(owner, name)
        fence.check.cache_clear()


def said(feature: str, internal: str) -> None:
    """The fence found `feature` broken and said so in one line naming `internal`."""
    assert fence.check()[feature], (feature, fence.check())
    (uses,) = [a.uses for a in fence.assumptions() if a.feature == feature]
    (line,) = [line for line in lines if f"uses for {uses} (" in line]
    assert internal in line and "\n" not in line, (internal, line)
    print(f"{feature}: {line}")


def failing(call) -> str:
    """What `call` raises with the fence taken away (every feature taken as it is)."""
    checked = fence.check
    fence.check = lambda: {a.feature: [] for a in fence.assumptions()}
    try:
        call()
    except Exception as e:  # what breaks without the fence, whatever it is
        return f"{type(e).__name__}: {str(e)[:100]}"
    finally:
        fence.check = checked
    raise AssertionError("the call did not fail without the fence")


def model():
    return host.managed(Checkpoint.open(checkpoint_folder).load_model("fp32"))


plain = Checkpoint.open(checkpoint_folder).load_model("fp32")
identity = random_identity(plain.config, seed=5)
g = torch.Generator().manual_seed(1)
width = plain.config.text_embed_dim
text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
SIZE = {"frames": 9, "width": 96, "height": 64}
STEPS = 1


def node_latents(consisid_model) -> torch.Tensor:
    out = ConsisIDSampler().sample(
        consisid_model, identity, text, seed=3, steps=STEPS, guidance=6.0, dynamic_cfg=False, scheduler="ddim",
        identity_strength=1.0, **SIZE,
    )
    return out[0]["samples"]


def core_latents(consisid_model) -> torch.Tensor:
    latents = sample(consisid_model, identity, text, seed=3, steps=STEPS, scheduler="ddim", device="cpu", **SIZE)
    return latents.permute(0, 2, 1, 3, 4)


# --- this ComfyUI is as the pack expects, and the node gives the core's latents
assert all(not found for found in fence.check().values()), fence.check()
reference = core_latents(plain)
assert torch.equal(node_latents(model()), reference)
print("as expected: nothing differs")


# --- partial loading: a castable layer class whose constructor changed
class ChangedLinear(comfy.ops.disable_weight_init.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, quant_config):
        super().__init__(in_features, out_features, bias, device, dtype)


with broken(comfy.ops.disable_weight_init, "Linear", ChangedLinear):
    said("partial_load", "comfy.ops.disable_weight_init.Linear")
    managed = model()
    assert torch.equal(node_latents(managed), reference)
    patcher = managed.managed.held(managed.transformer)
    assert isinstance(patcher, host.WholeModelPatcher)
    assert not any(hasattr(m, "comfy_cast_weights") for m in managed.transformer.modules())
    print("  loads whole, same latents; without the fence:", failing(lambda: node_latents(model())))


# --- LoRA patches: load_lora no longer maps diffusers/PEFT keys
folder = Path(tempfile.mkdtemp())
g = torch.Generator().manual_seed(2)
layer = plain.transformer.get_submodule("transformer_blocks.0.attn1.to_q")
save_file({
    "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, layer.in_features, generator=g) * 0.3,
    "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(layer.out_features, 2, generator=g) * 0.3,
}, folder / "lora.safetensors")
lora = read_lora(folder / "lora.safetensors")
with_lora = core_latents(with_loras(plain, [(lora, 1.0)]))
assert not torch.equal(with_lora, reference)
assert torch.allclose(node_latents(host.with_lora(model(), lora, 1.0)), with_lora, atol=1e-5)
with broken(comfy.lora, "load_lora", lambda lora, to_load, log_missing=True: {}):
    said("lora_patches", "comfy.lora.load_lora")
    lora_model = host.with_lora(model(), lora, 1.0)
    assert torch.allclose(node_latents(lora_model), with_lora, atol=1e-5)

    def dropped():  # without the fence the LoRA would be silently left out
        assert torch.allclose(node_latents(host.with_lora(model(), lora, 1.0)), with_lora, atol=1e-5), "LoRA left out"

    print("  merged per run, same latents; without the fence:", failing(dropped))


# --- model management: load_models_gpu's memory argument renamed
def load_models_gpu(models, memory_required_bytes=0):
    raise AssertionError("must not be called")


with broken(comfy.model_management, "load_models_gpu", load_models_gpu):
    said("model_management", "load_models_gpu")
    assert fence.check()["partial_load"] == fence.check()["lora_patches"] == ["(needs model_management)"]
    assert torch.equal(node_latents(model()), reference)
    print("  the core places the models, same latents; without the fence:", failing(lambda: node_latents(model())))


# --- one model's unload: ComfyUI's loaded models changed
class ChangedLoadedModel:  # its model_unload renamed
    def unload(self):
        raise AssertionError("must not be called")


freed = []
with broken(comfy.model_management, "LoadedModel", ChangedLoadedModel), \
        broken(comfy.model_management, "free_memory", lambda memory, device, *a, **k: freed.append(device)):
    said("unload_one", "LoadedModel.model_unload")
    managed = model()
    managed.managed.patcher("transformer", managed.transformer)
    host.unload(managed.managed, managed.transformer)
    assert freed == [torch.device("cpu")], freed
    print("  frees that device instead")


# --- progress bars, previews, Cancel
class ChangedBar:
    def __init__(self, total):
        self.total = total

    def update_absolute(self, value):
        raise AssertionError("must not be called")


with broken(comfy.utils, "ProgressBar", ChangedBar):
    said("progress", "ProgressBar.update_absolute")
    progress = host.Progress(2)
    progress.update(1)
    assert progress._bar is None
    print("  no bar; without the fence:", failing(lambda: host.Progress(2).update(1)))
with broken(comfy.cli_args, "LatentPreviewMethod", DELETED):
    said("previews", "LatentPreviewMethod")
    assert not host.Progress(2)._previews
    print("  no previews")
with broken(comfy.model_management, "throw_exception_if_processing_interrupted", DELETED):
    said("cancel", "throw_exception_if_processing_interrupted")
    host.check_interrupted()
    print("  Cancel between nodes")


# --- model folders: no fallback, a one-line refusal when used
with broken(folder_paths, "get_save_image_path", DELETED):
    said("folders", "get_save_image_path")
    host.register_folders()  # the pack still loads
    try:
        host.save_path("consisid/identity", "id.safetensors")
    except fence.ComfyApiError as e:
        assert "folder_paths.get_save_image_path" in str(e) and "\n" not in str(e), e
        print("  refused:", e)
    else:
        raise AssertionError("saving went on without folder_paths.get_save_image_path")


# --- the native T5 route, checked on the CLIP at hand
class OldClip:
    def tokenize(self, text, return_word_ids=False):
        return {"t5xxl": [[(1, 1.0)]]}


class OtherTokens:
    def tokenize(self, text, **options):
        return {"t5xxl": [[{"id": 1}]]}


for clip in (OldClip(), OtherTokens()):
    try:
        fence.t5_pairs(clip, "a prompt", 226)
    except fence.ComfyApiError as e:
        assert "\n" not in str(e) and "own T5" in str(e), e
        print("t5_tokens: refused:", e)
    else:
        raise AssertionError(f"{type(clip).__name__}'s tokens were taken")


# --- the native path: core's quantized formats (a format core's registry lacks is refused alone)
from consisid_pack.consisid_core import quant  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402

algos = comfy.ops.QUANT_ALGOS  # the dict core's mixed-precision Linear reads (comfy.quant_ops's own)
mxfp8 = algos.pop("mxfp8")
fence.check.cache_clear()
lines.clear()
try:
    said("native_quant", "QUANT_ALGOS has no 'mxfp8'")
    comfy_parts.require_format("nvfp4")  # the others load as before
    try:
        comfy_parts.require_format("mxfp8")
    except fence.ComfyApiError as e:
        assert "'mxfp8'" in str(e) and "nvfp4" in str(e) and "\n" not in str(e), e
        print("  refused:", e)
    else:
        raise AssertionError("mxfp8 was taken without core's reader for it")
    layer = comfy.ops.mixed_precision_ops({"mixed_ops": True}, torch.float32).Linear(256, 32, bias=False)
    holder = torch.nn.Module()
    holder.q = layer
    stored = quant.quantize({"blocks.1.q.weight": torch.randn(32, 256)}, "mxfp8")
    try:
        holder.load_state_dict({k.removeprefix("blocks.1."): v for k, v in stored.items()})
    except KeyError as e:
        print(f"  without the fence: KeyError: {e}")
    else:
        raise AssertionError("core loaded mxfp8 without its registry entry")
finally:
    algos["mxfp8"] = mxfp8
    fence.check.cache_clear()
assert not fence.check()["native_quant"]
print("fence: every assumption checked")
