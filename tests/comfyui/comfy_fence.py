"""Run by test_comfyui_fence.py inside a ComfyUI source folder: the ComfyUI fence (`nodes/fence.py`).

Every assumption the pack makes about ComfyUI's internals is broken on purpose, one at a time, as a
ComfyUI release could break it. Each time the fence must name what differs in one log line and the
feature must fall back (the same latents) or be refused with one line; where the fence is what
saves the run, the same call without it is shown to fail ("without the fence: ...").

Arguments: a tiny checkpoint folder (made by make-tiny); on a ComfyUI with native CogVideoX also a
native tiny checkpoint folder and a CogVideoX VAE file of the released architecture, for the native
path's assumptions (`comfy_parts.ASSUMPTIONS`), broken the same way at the end.
"""

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

checkpoint_folder, *native_files = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import utils.extra_config  # noqa: E402, F401 - ComfyUI's utils package first, as its main.py imports it
import comfy.cli_args  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import server  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from consisid_pack.consisid_core import quant  # noqa: E402
from consisid_pack.consisid_core.checkpoint import Checkpoint  # noqa: E402
from consisid_pack.consisid_core.lora import read_lora, with_loras  # noqa: E402
from consisid_pack.consisid_core.sampling import sample  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings  # noqa: E402
from consisid_pack.consisid_core.tiny import random_identity  # noqa: E402
from consisid_pack.nodes import fence, folders, managed, progress  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402
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
    had = hasattr(owner, name)
    old = vars(owner).get(name, getattr(owner, name, None))  # a class's own entry as it is (a classmethod)
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
    return managed.managed(Checkpoint.open(checkpoint_folder).load_model("fp32"))


plain = Checkpoint.open(checkpoint_folder).load_model("fp32")
identity = random_identity(plain.config, seed=5)
g = torch.Generator().manual_seed(1)
width = plain.config.text_embed_dim
text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
SIZE = {"length": 9, "width": 96, "height": 64}
STEPS = 1


def node_latents(consisid_model) -> torch.Tensor:
    out = ConsisIDSampler().sample(
        consisid_model, identity, text, seed=3, steps=STEPS, cfg=6.0, dynamic_cfg=False, scheduler="ddim",
        identity_strength=1.0, **SIZE,
    )
    return out[0]["samples"]


def core_latents(consisid_model) -> torch.Tensor:
    latents = sample(consisid_model, identity, text, seed=3, steps=STEPS, scheduler="ddim", device="cpu", **SIZE)
    return latents.permute(0, 2, 1, 3, 4)


# --- this ComfyUI is as the pack expects (but the native path, on a ComfyUI without native CogVideoX), and
# the node gives the core's latents
NATIVE_OFF = set() if comfy_parts.AVAILABLE else {a.feature for a in comfy_parts.ASSUMPTIONS}
assert all(not found for feature, found in fence.check().items() if feature not in NATIVE_OFF), fence.check()
reference = core_latents(plain)
assert torch.equal(node_latents(model()), reference)
print("as expected: nothing differs")


# --- partial loading: a castable layer class whose constructor changed
class ChangedLinear(comfy.ops.disable_weight_init.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, quant_config):
        super().__init__(in_features, out_features, bias, device, dtype)


with broken(comfy.ops.disable_weight_init, "Linear", ChangedLinear):
    said("partial_load", "comfy.ops.disable_weight_init.Linear")
    loaded = model()
    assert torch.equal(node_latents(loaded), reference)
    patcher = loaded.managed.held(loaded.transformer)
    assert isinstance(patcher, managed.WholeModelPatcher)
    assert not any(hasattr(m, "comfy_cast_weights") for m in loaded.transformer.modules())
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
assert torch.allclose(node_latents(managed.with_lora(model(), lora, 1.0)), with_lora, atol=1e-5)
with broken(comfy.lora, "load_lora", lambda lora, to_load, log_missing=True: {}):
    said("lora_patches", "comfy.lora.load_lora")
    lora_model = managed.with_lora(model(), lora, 1.0)
    assert torch.allclose(node_latents(lora_model), with_lora, atol=1e-5)

    def dropped():  # without the fence the LoRA would be silently left out
        assert torch.allclose(node_latents(managed.with_lora(model(), lora, 1.0)), with_lora, atol=1e-5), "LoRA left out"

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
    loaded = model()
    loaded.managed.patcher("transformer", loaded.transformer)
    managed.unload(loaded.managed, loaded.transformer)
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
    bar = progress.Progress(2)
    bar.update(1)
    assert bar._bar is None
    print("  no bar; without the fence:", failing(lambda: progress.Progress(2).update(1)))
with broken(comfy.cli_args, "LatentPreviewMethod", DELETED):
    said("previews", "LatentPreviewMethod")
    assert not progress.Progress(2)._previews
    print("  no previews")
with broken(comfy.model_management, "throw_exception_if_processing_interrupted", DELETED):
    said("cancel", "throw_exception_if_processing_interrupted")
    progress.check_interrupted()
    print("  Cancel between nodes")


# --- model folders: no fallback, a one-line refusal when used
with broken(folder_paths, "get_save_image_path", DELETED):
    said("folders", "get_save_image_path")
    folders.register_folders()  # the pack still loads
    try:
        folders.save_path("consisid/identity", "id.safetensors")
    except fence.ComfyApiError as e:
        assert "folder_paths.get_save_image_path" in str(e) and "\n" not in str(e), e
        print("  refused:", e)
    else:
        raise AssertionError("saving went on without folder_paths.get_save_image_path")


# --- the core T5 route, checked on the CLIP at hand
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

# --- dynamic VRAM (v0.33): the patcher class core builds its own models' patchers from, changed
if hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
    with broken(comfy.model_patcher, "CoreModelPatcher", object):
        said("dynamic_vram", "comfy.model_patcher.CoreModelPatcher")
        assert not managed.dynamic_vram()
        print("  taken as off")
else:
    assert fence.works("dynamic_vram")
    print("dynamic_vram: this ComfyUI has none, nothing to take part in")

# --- the native MODEL's face layers, loaded beside it: ModelPatcher's additional models renamed
if comfy_parts.AVAILABLE:
    with broken(comfy.model_patcher.ModelPatcher, "set_additional_models", DELETED):
        said("native_face_patcher", "ModelPatcher.set_additional_models")
        try:
            comfy_parts.with_face_layers(None, None, 16, 0.7)
        except fence.ComfyApiError as e:
            assert "ModelPatcher.set_additional_models" in str(e) and "\n" not in str(e), e
            print("  refused:", e)
        else:
            raise AssertionError("the face layers were added without ModelPatcher.set_additional_models")
else:
    assert fence.check()["native_face_patcher"] == ["(needs native_cogvideox)"]
    print("native_face_patcher: needs native CogVideoX, which this ComfyUI has not")

# --- prompts made before inputs were renamed: ComfyUI's on-prompt handlers changed
with broken(server.PromptServer, "add_on_prompt_handler", DELETED):
    said("prompt_handlers", "add_on_prompt_handler")
    fence.on_prompt(lambda json_data: json_data)  # the pack still loads
    print("  old input names: ComfyUI's own 'Required input is missing'")

# =============================================================================================
# The native path: comfy_parts.ASSUMPTIONS, on a ComfyUI with native CogVideoX


def refused(call, option: str, internal: str) -> str:
    """`call` refused in one line naming the node (`option`) and the internal that differs."""
    try:
        call()
    except fence.ComfyApiError as e:
        message = str(e)
        assert option in message and internal in message and "\n" not in message, (option, internal, message)
        return message
    raise AssertionError(f"{option} went on")


def native_section(native_folder: str, vae_file: str) -> None:
    import comfy.k_diffusion.sampling
    import comfy.ldm.cogvideo.model as cogvideo
    import comfy.ldm.cogvideo.vae as cogvideo_vae
    import comfy.model_sampling
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.sd
    import node_helpers

    from consisid_pack.consisid_core.native import comfy_named
    from consisid_pack.nodes.native import nodes as native

    config = Checkpoint.open(native_folder).transformer_config
    face = random_identity(config, seed=5)
    g = torch.Generator().manual_seed(1)
    words = TextEmbeddings(torch.randn(1, 226, config["text_embed_dim"], generator=g),
                           torch.randn(1, 226, config["text_embed_dim"], generator=g))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_file))
    vae.first_stage_model.float()
    nmodel = native.native_model(native_folder, torch.float32)

    def latents(model, sampler="ddim", start=0.0, end=1.0):
        first = torch.zeros(1, 16, 1, 8, 12)
        positive, negative = native.identity_conditioned([[words.positive, {}]], [[words.negative, {}]], face, first,
                                                         1.0, start, end)
        empty = torch.zeros(1, 16, 3, 8, 12)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(6.0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
        sampler = comfy.samplers.sampler_object(sampler) if isinstance(sampler, str) else sampler
        noise = comfy_parts.ReferenceNoise(3).generate_noise({"samples": empty})
        return guider.sample(noise, empty, sampler, sigmas, seed=3, disable_pbar=True)

    def encode(**options):
        return native.ConsisIDIdentityConditioning().encode(
            [[words.positive, {}]], [[words.negative, {}]], face, vae, 96, 64, 9, 1.0,
            options.get("start", 0.0), options.get("end", 1.0), first_frame_seed=options.get("seed", -1))

    reference = latents(nmodel)
    assert all(not found for found in fence.check().values()), fence.check()
    print("native: as expected")

    # --- the Native Model Loader's call into core
    def load_renamed(sd, options=None):
        raise AssertionError("must not be called")

    with broken(comfy.sd, "load_diffusion_model_state_dict", load_renamed):
        said("native_load", "load_diffusion_model_state_dict")
        print("  refused:", refused(lambda: native.ConsisIDNativeModelLoader().load("tiny", "fp32"),
                                    "ConsisID Native Model Loader", "load_diffusion_model_state_dict"))
        print("  without the fence:", failing(lambda: native.native_model(native_folder, torch.float32)))

    # --- the transformer: a block's outputs, the rotary embedding's signature
    block_forward = cogvideo.CogVideoXBlock.forward

    def three_outputs(self, *args, **kwargs):
        return (*block_forward(self, *args, **kwargs), None)

    with broken(cogvideo.CogVideoXBlock, "forward", three_outputs):
        said("native_transformer", "CogVideoXBlock")
        print("  refused:", refused(lambda: native.ConsisIDFaceModules().apply(nmodel, "tiny_face.safetensors"),
                                    "ConsisID Face Layers", "CogVideoXBlock"))
        print("  without the fence:", failing(lambda: latents(nmodel)))

    def rotary_scaled(self, h, w, t, device, scale=1.0):
        raise AssertionError("must not be called")

    with broken(cogvideo.CogVideoXTransformer3DModel, "_get_rotary_emb", rotary_scaled):
        said("native_transformer", "_get_rotary_emb(self, h, w, t, device)")
        refused(lambda: native.ConsisIDNativeModelLoader().load("tiny", "fp32"), "ConsisID Native Model Loader",
                "_get_rotary_emb")

    # --- model sampling: reshape_sigma's signature
    with broken(comfy.model_sampling, "reshape_sigma", lambda sigma: sigma):
        said("native_model_sampling", "reshape_sigma")
        refused(lambda: native.ConsisIDNativeModelLoader().load("tiny", "fp32"), "ConsisID Native Model Loader",
                "reshape_sigma")
        print("  refused; without the fence:", failing(lambda: latents(nmodel)))

    # --- the DIFFUSION_MODEL wrapper: its executor no longer carries the model (class_obj)
    def classless(cls, original, class_obj, wrappers, idx=0):
        return cls(original, None, wrappers, idx=idx)

    with broken(comfy.patcher_extension.WrapperExecutor, "new_class_executor", classmethod(classless)):
        said("native_patches", "class_obj")
        refused(lambda: native.ConsisIDFaceModules().apply(nmodel, "tiny_face.safetensors"), "ConsisID Face Layers",
                "WrappersMP.DIFFUSION_MODEL")
        print("  refused; without the fence:", failing(lambda: latents(nmodel)))

    # --- conditioning: core's helper changes the conditioning it is given
    def in_place(conditioning, values={}, append=False):  # noqa: B006 - core's signature
        for entry in conditioning:
            entry[1].update(values)
        return conditioning

    with broken(node_helpers, "conditioning_set_values", in_place):
        said("native_conds", "conditioning_set_values")
        refused(lambda: encode(), "ConsisID Identity Conditioning", "conditioning_set_values")

        def untouched():
            given = [[words.positive, {}]]
            native.identity_conditioned(given, given, face, torch.zeros(1, 16, 1, 8, 12))
            assert given[0][1] == {}, "the conditioning given was changed"

        print("  refused; without the fence:", failing(untouched))

    # --- start/end percent: the samplers no longer tell the model its sigma
    calc = comfy.samplers._calc_cond_batch

    def sigma_unsaid(model, conds, x_in, timestep, model_options):
        return calc(model, conds, x_in, timestep, model_options)

    with broken(comfy.samplers, "_calc_cond_batch", sigma_unsaid):
        said("native_percent", "_calc_cond_batch")
        refused(lambda: encode(start=0.2), "start_percent and end_percent", "_calc_cond_batch")
        encode()  # the whole range needs no sigma
        print("  a part of the steps refused, all of them taken")

    # --- dynamic CFG: cfg_function's args renamed
    cfg = comfy.samplers.cfg_function

    def renamed_args(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):  # noqa: B006
        if "sampler_cfg_function" not in model_options:
            return cfg(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond, uncond)
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "scale": cond_scale, "timestep": timestep,
                "model": model, "model_options": model_options}
        return x - model_options["sampler_cfg_function"](args)

    with broken(comfy.samplers, "cfg_function", renamed_args):
        said("native_dynamic_cfg", "cfg_function")
        refused(lambda: native.ConsisIDDynamicCFG().patch(nmodel), "ConsisID Dynamic CFG", "cfg_function")
        print("  refused; without the fence:", failing(lambda: latents(comfy_parts.with_dynamic_cfg(nmodel))))

    # --- the DPM sampler: core's DPM-Solver++(2M) SDE without its noise_sampler keyword
    def older_dpm(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0):
        raise AssertionError("must not be called")

    with broken(comfy.k_diffusion.sampling, "sample_dpmpp_2m_sde", older_dpm):
        said("native_dpm", "sample_dpmpp_2m_sde")
        refused(lambda: native.ConsisIDDPMSampler().get_sampler(3), "ConsisID DPM Sampler", "sample_dpmpp_2m_sde")
        print("  refused; without the fence:", failing(lambda: latents(nmodel, comfy_parts.reference_dpm_sampler(3))))

    # --- LoRA: load_lora no longer maps the keys the native LoRA gives it
    folder = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(2)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, width, generator=g),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(width, 2, generator=g)},
              folder / "native_lora.safetensors")
    native_lora = comfy_named(read_lora(folder / "native_lora.safetensors"))
    assert not torch.equal(latents(comfy_parts.with_lora(nmodel, native_lora, 1.0)), reference)
    with broken(comfy.lora, "load_lora", lambda lora, to_load, log_missing=True: {}):
        said("native_lora", "comfy.lora.load_lora")
        refused(lambda: native.ConsisIDNativeLoRA().apply(nmodel, "x.safetensors", 1.0), "ConsisID Native LoRA",
                "load_lora")

        def dropped():
            assert not torch.equal(latents(comfy_parts.with_lora(nmodel, native_lora, 1.0)), reference), "LoRA left out"

        print("  refused; without the fence:", failing(dropped))

    # --- the VAE: its class gone; then its batched decode, its encoder's conv_cache
    frames = torch.zeros(1, 16, 3, 8, 12)
    with broken(cogvideo_vae, "AutoencoderKLCogVideoX", DELETED):
        said("native_vae", "AutoencoderKLCogVideoX")
        assert fence.check()["native_reference_decode"] == ["(needs native_vae)"]
        refused(lambda: native.ConsisIDNativeVAEDecode().decode({"samples": frames}, vae), "ConsisID Native VAE Decode",
                "AutoencoderKLCogVideoX")
        refused(lambda: encode(), "ConsisID Identity Conditioning", "AutoencoderKLCogVideoX")
        print("  Identity Conditioning and Native VAE Decode refused")
    with broken(cogvideo_vae.AutoencoderKLCogVideoX, "_decode_batched", DELETED):
        said("native_reference_decode", "_decode_batched")
        small = torch.zeros(1, 16, 2, 4, 6)  # frames of 48×32: the released-size VAE is slow on a CPU
        (decoded,) = native.ConsisIDNativeVAEDecode().decode({"samples": small}, vae)
        assert torch.equal(decoded, vae.decode(small).reshape(-1, 32, 48, 3))
        print("  decoded in core's order")
    class Encoder3D(torch.nn.Module):  # an encoder that takes no cache
        def forward(self, x):
            return x

    with broken(cogvideo_vae, "Encoder3D", Encoder3D):
        said("native_first_frame_sample", "Encoder3D.forward(x, conv_cache=)")
        assert torch.equal(encode(seed=5)[0][0][1]["concat_latent_image"], encode()[0][0][1]["concat_latent_image"])
        print("  the posterior mean, whatever the seed")
    assert not torch.equal(encode(seed=5)[0][0][1]["concat_latent_image"], encode()[0][0][1]["concat_latent_image"])

    # --- where latents are kept
    with broken(comfy.model_management, "intermediate_device", DELETED):
        said("native_devices", "intermediate_device")
        assert encode()[2]["samples"].device == torch.device("cpu")
        print("  on the CPU")

    # --- core's quantized formats: one gone from core's registry is refused alone
    if not hasattr(comfy.ops, "QUANT_ALGOS"):
        assert fence.check()["native_quant"]
        print("native_quant: this ComfyUI has no quantized formats, each refused in one line")
        return
    algos = comfy.ops.QUANT_ALGOS  # the dict core's mixed-precision Linear reads (comfy.quant_ops's own)
    mxfp8 = algos.pop("mxfp8")
    fence.check.cache_clear()
    lines.clear()
    try:
        said("native_quant", "QUANT_ALGOS has no 'mxfp8'")
        comfy_parts.require_format("nvfp4")  # the others load as before
        refused(lambda: comfy_parts.require_format("mxfp8"), "'mxfp8'", "nvfp4")
        holder = torch.nn.Module()
        holder.q = comfy.ops.mixed_precision_ops({"mixed_ops": True}, torch.float32).Linear(256, 32, bias=False)
        stored = quant.quantize({"blocks.1.q.weight": torch.randn(32, 256)}, "mxfp8")
        print("  refused; without the fence:",
              failing(lambda: holder.load_state_dict({k.removeprefix("blocks.1."): v for k, v in stored.items()})))
    finally:
        algos["mxfp8"] = mxfp8
        fence.check.cache_clear()
    assert not fence.check()["native_quant"]


if comfy_parts.AVAILABLE:
    native_section(*native_files)
print("fence: every assumption checked")
