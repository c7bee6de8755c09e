"""The native path against hostile inputs: face-layers files, single-file transformers and
scheduler configs built in the real formats (read by the core, as every weights file is), and the
native nodes given bad numbers, images, VAEs, identities and latents (in-process in a real ComfyUI
with native CogVideoX, and through a real server's /prompt where a case comes from there).

Each is refused in one line of the pack's error type that names the value and the fix, before the
work it would cost; reading a face-layers file stops at Cancel between tensors and modules."""

from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from consisid_core.checkpoint import Checkpoint
from consisid_core.errors import CheckpointError
from consisid_core.face_layers import FaceLayers, face_config, face_layers
from consisid_core.native import export, read_face_file, source_weights
from refusals import assert_refused

WEIGHTS = "diffusion_pytorch_model.safetensors"


def one_line(message: str) -> str:
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


def refused(match: str, call, error: type = CheckpointError) -> str:
    """`assert_refused` with `match` as plain text."""
    return assert_refused(call, re.escape(match), error)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """The tiny checkpoint exported for the native path: (transformer file, face-layers file)."""
    return export(tiny_dir, tmp_path_factory.mktemp("exported"), "tiny")


def face_file(path, source, tensors=None, **metadata) -> str:
    """`source` (a face-layers file) written again to `path` with `tensors` changed (None: removed)
    and `metadata` entries changed (None: removed)."""
    with safe_open(source, framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    for changes, into in ((tensors or {}, kept), (metadata, meta)):
        for key, value in changes.items():
            if value is None:
                into.pop(key, None)
            else:
                into[key] = value
    save_file(kept, path, metadata=meta)
    return path


def config_of(source) -> dict:
    with safe_open(source, framework="pt") as f:
        return json.loads(f.metadata()["config"])


# ---------------------------------------------------------------------------------------------
# Face-modules files: the reader


def test_a_good_face_layers_file_reads_and_builds(exported):
    weights, info = read_face_file(exported[1])
    modules = face_layers(weights, info["config"])
    assert isinstance(modules, FaceLayers) and info["latent_channels"] == 4 and info["scaling_factor"] == 0.7
    assert all(torch.equal(p, weights[k]) for k, p in modules.state_dict().items())


@pytest.mark.parametrize("damage", ["empty", "garbage", "pickled", "half", "lying-header"])
def test_a_face_layers_file_that_is_no_safetensors_file(exported, tmp_path, damage):
    path = tmp_path / "face.safetensors"
    data = exported[1].read_bytes()
    if damage == "pickled":
        torch.save({"local_facial_extractor.latents": torch.zeros(1)}, path)
    else:
        header = json.dumps({"local_facial_extractor.latents": {"dtype": "F32", "shape": [10**6, 10**6],
                                                                 "data_offsets": [0, 16]}}).encode()
        path.write_bytes({"empty": b"", "garbage": bytes(range(256)) * 16, "half": data[: len(data) // 2],
                          "lying-header": len(header).to_bytes(8, "little") + header + bytes(16)}[damage])
    refused(f"'{path}' is not a readable .safetensors file (", lambda: read_face_file(path))


def test_a_safetensors_file_that_is_not_a_face_layers_file(exported):
    refused("is not a ConsisID face-layers file (write one with `python -m consisid_core export`)",
            lambda: read_face_file(exported[0]))


@pytest.mark.parametrize(
    "metadata, says",
    [
        ({"format": None}, "is not a ConsisID face-layers file"),
        ({"config": None}, "has no 'config' setting"),
        ({"config": "[1, 2]"}, "its 'config' setting must be a JSON object, found list"),
        ({"config": "null"}, "its 'config' setting must be a JSON object, found NoneType"),
        ({"config": "{"}, "its 'config' setting is not JSON ("),
        ({"config": "[" * 100_000 + "]" * 100_000}, "its 'config' setting is not JSON ("),
        ({"config": " " * (2**20 + 1)}, "has no 'config' setting of at most 1024 kB"),
        ({"latent_channels": None}, "its 'latent_channels' setting None must be a whole number from 1 to 1024"),
        ({"latent_channels": "1000000000"}, "its 'latent_channels' setting 1000000000 must be a whole number from 1 to 1024"),
        ({"latent_channels": "abc"}, "its 'latent_channels' setting 'abc' must be a whole number"),
        ({"latent_channels": "16.5"}, "its 'latent_channels' setting '16.5' must be a whole number"),
        ({"scaling_factor": "nan"}, "its 'scaling_factor' setting nan must be a finite number from 1e-06 to 1e+06"),
        ({"scaling_factor": "inf"}, "its 'scaling_factor' setting inf must be a finite number"),
        ({"scaling_factor": "0"}, "its 'scaling_factor' setting 0.0 must be a finite number"),
        ({"scheduler": "[]"}, "its 'scheduler' setting must be a JSON object, found list"),
    ],
)
def test_each_setting_of_a_face_layers_file_is_checked(exported, tmp_path, metadata, says):
    path = face_file(tmp_path / "face.safetensors", exported[1], **metadata)
    message = refused(says, lambda: read_face_file(path))
    assert str(path) in message


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(cross_attn_interval=0), "'cross_attn_interval' 0 must be a whole number from 1 to 512"),
        (dict(LFE_depth=-1), "'LFE_depth' -1 must be a whole number from 1 to 256"),
        (dict(num_layers=10**9), "'num_layers' 1000000000 must be a whole number from 1 to 512"),
        (dict(LFE_vit_dim=1e9), "'LFE_vit_dim' 1000000000.0 must be a whole number written without a decimal point"),
        (dict(LFE_num_heads="4"), "'LFE_num_heads' '4' must be a whole number"),
        (dict(LFE_dim_head=math.nan), "'LFE_dim_head' nan must be a whole number"),
        (dict(is_kps="no"), "'is_kps' is 'no', expected true or false"),
        (dict(LFE_depth=7), "LFE_depth 7 is not a multiple of LFE_num_scale 5"),
        (dict(LFE_output_dim=41), "LFE_output_dim 41 must be two thirds of the transformer's width 64 (42)"),
    ],
)
def test_every_config_value_the_face_layers_use_is_bounded(exported, tmp_path, changes, says):
    config = {**config_of(exported[1]), **changes}
    path = face_file(tmp_path / "face.safetensors", exported[1], config=json.dumps(config))
    message = refused(says, lambda: read_face_file(path))
    assert f"{path} (config)" in message


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(beta_end=1e300), "'beta_end' 1e+300 must be a finite number from 0 to 1"),
        (dict(num_train_timesteps=-5), "'num_train_timesteps' -5 must be a whole number from 1 to 100000"),
        (dict(num_train_timesteps=10**9), "'num_train_timesteps' 1000000000 must be a whole number from 1 to 100000"),
        (dict(beta_schedule="cosine"), "'beta_schedule' is 'cosine', expected one of"),
        (dict(prediction_type="epsilon"), "prediction_type is 'epsilon'; ConsisID predicts v (v_prediction)"),
        (dict(beta_start=1.0, beta_end=1.0), "makes a noise schedule that is not finite and rising (betas 1.0 to 1.0)"),
    ],
)
def test_every_scheduler_value_the_native_model_uses_is_bounded(exported, tmp_path, changes, says):
    with safe_open(exported[1], framework="pt") as f:
        scheduler = {**json.loads(f.metadata()["scheduler"]), **changes}
    path = face_file(tmp_path / "face.safetensors", exported[1], scheduler=json.dumps(scheduler))
    message = refused(says, lambda: read_face_file(path))
    assert f"{path} (scheduler)" in message


def _one_key(source) -> tuple[str, torch.Tensor]:
    with safe_open(source, framework="pt") as f:
        key = sorted(f.keys())[0]
        return key, f.get_tensor(key)


@pytest.mark.parametrize(
    "change, says",
    [
        ("nan", "holds NaN values: the file is damaged"),
        ("inf", "holds infinite values"),
        ("huge", "holds absurdly large (1e+30) values"),
        ("int", "holds I64 values, where a model's weights are floats"),
        ("missing", "do not match their config: keys 1 missing ("),
        ("extra-layer", "do not match their config: keys 1 unexpected (local_facial_extractor.layers.999999999.0.norm1.weight)"),
        ("shape", "of the wrong shape ("),
    ],
)
def test_face_module_weights_are_checked_against_their_config_and_for_finite_values(exported, tmp_path, change, says):
    key, tensor = _one_key(exported[1])
    tensors = {
        "nan": {key: torch.full_like(tensor, math.nan)},
        "inf": {key: torch.full_like(tensor, math.inf)},
        "huge": {key: torch.full_like(tensor, 1e30)},
        "int": {key: torch.zeros(tensor.shape, dtype=torch.int64)},
        "missing": {key: None},
        "extra-layer": {"local_facial_extractor.layers.999999999.0.norm1.weight": torch.zeros(4)},
        "shape": {key: torch.zeros(*tensor.shape, 2)},
    }[change]
    path = face_file(tmp_path / "face.safetensors", exported[1], tensors)
    refused(says, lambda: read_face_file(path))


class Cancelled(Exception):
    """What a Cancel callback raises here (ComfyUI's is InterruptProcessingException)."""


def test_cancel_is_called_between_tensors_and_between_modules(exported):
    calls = []

    def cancel_at(n):
        def cancel():
            calls.append(1)
            if len(calls) == n:
                raise Cancelled

        return cancel

    with safe_open(exported[1], framework="pt") as f:
        tensors = len(list(f.keys()))
    weights, info = read_face_file(exported[1], cancel_at(0))
    read_all = len(calls)
    assert read_all >= tensors  # a Cancel point before each tensor, and between the modules built for the check
    calls.clear()
    with pytest.raises(Cancelled):
        read_face_file(exported[1], cancel_at(read_all - 1))  # the last tensor is never read
    calls.clear()
    built = len(FaceLayers(info["config"], cancel_at(0)).perceiver_cross_attention)
    assert len(calls) == 1 + built  # before the extractor and before each cross-attention
    calls.clear()
    with pytest.raises(Cancelled):
        face_layers(weights, info["config"], cancel_at(2))


def test_a_slow_build_stops_at_cancel(exported, tmp_path):
    """A face-layers file of the deepest modules the bounds allow (512 cross-attentions), whose every
    tensor is slow to come (a network disk): Cancel pressed meanwhile stops the read at the next tensor."""
    config = {**config_of(exported[1]), "num_layers": 512, "cross_attn_interval": 1}
    torch.manual_seed(0)
    modules = FaceLayers(face_config(config))
    path = tmp_path / "deep_face.safetensors"
    with safe_open(exported[1], framework="pt") as f:
        metadata = {**f.metadata(), "config": json.dumps(config)}
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, path, metadata=metadata)
    pressed, seen = threading.Event(), []

    def slow_cancel():
        seen.append(1)
        if pressed.is_set():
            raise Cancelled
        pressed.wait(0.002)

    threading.Timer(0.3, pressed.set).start()
    with pytest.raises(Cancelled):
        read_face_file(path, slow_cancel)
    assert len(seen) < len(modules.state_dict())  # stopped before the last tensor


# ---------------------------------------------------------------------------------------------
# The native loader's single-file transformer


def test_the_native_loaders_read_stops_at_cancel(tiny_dir):
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        source_weights(tiny_dir, cancel)
    assert len(calls) == 3


def _transformer_file(tiny_dir, tmp_path, **tensors) -> str:
    with safe_open(tiny_dir / "transformer" / WEIGHTS, framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys()}
    kept.update(tensors)
    path = tmp_path / "single.safetensors"
    save_file(kept, path)
    return path


def test_a_good_single_file_reads_as_its_folder(tiny_dir, tmp_path):
    weights, config = source_weights(_transformer_file(tiny_dir, tmp_path))
    folder_weights, folder_config = source_weights(tiny_dir)
    assert weights.keys() == folder_weights.keys() and all(torch.equal(weights[k], folder_weights[k]) for k in weights)
    assert config["num_layers"] == folder_config["num_layers"] == Checkpoint.open(tiny_dir).transformer_config["num_layers"]


@pytest.mark.parametrize(
    "key, tensor, says",
    [
        ("local_facial_extractor.layers.999999999.0.norm1.weight", torch.zeros(32),
         "'LFE_depth' 1000000000 must be a whole number from 1 to 256"),
        ("transformer_blocks.100000.norm1.norm.weight", torch.zeros(64),
         "'num_layers' 100001 must be a whole number from 1 to 512"),
        ("transformer_blocks.3.norm1.norm.weight", torch.zeros(64), "do not match their config: keys"),
        ("proj_out.weight", torch.full((16, 64), math.nan), "'proj_out.weight' holds NaN values"),
        ("proj_out.weight", torch.full((16, 64), 1e30), "'proj_out.weight' holds absurdly large"),
        ("proj_out.bias", torch.zeros(16, dtype=torch.int32), "'proj_out.bias' holds I32 values"),
    ],
    ids=["billion-lfe-layers", "huge-block-index", "block-gap", "nan", "huge", "int"],
)
def test_a_single_file_transformer_is_read_as_a_checkpoint(tiny_dir, tmp_path, key, tensor, says):
    path = _transformer_file(tiny_dir, tmp_path, **{key: tensor})
    refused(says, lambda: source_weights(path))


def test_a_scheduler_config_in_a_folder_is_checked_before_any_weights(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 1e300}))
    refused("'beta_end' 1e+300 must be a finite number from 0 to 1", lambda: source_weights(folder))


# ---------------------------------------------------------------------------------------------
# The native nodes, in-process in a real ComfyUI with native CogVideoX

from native_tools import NEEDS_NATIVE, import_comfyui  # noqa: E402


@pytest.fixture(scope="module")
def native(native_tiny_dir):
    """The pack in a real ComfyUI: its native nodes, a native tiny MODEL, an identity and text that fit it."""
    import types

    import_comfyui()
    from consisid_pack.consisid_core.text import TextEmbeddings
    from consisid_pack.consisid_core.tiny import random_identity
    from consisid_pack.nodes.native import comfy_parts, nodes

    folder = native_tiny_dir
    config = Checkpoint.open(folder).transformer_config
    g = torch.Generator().manual_seed(0)
    words = TextEmbeddings(*(torch.randn(1, 226, config["text_embed_dim"], generator=g) for _ in range(2)))
    return types.SimpleNamespace(nodes=nodes, parts=comfy_parts, folder=folder, config=config, text=words,
                                 identity=random_identity(config, seed=3), model=nodes.native_model(folder, torch.float32))


def _encode(native, vae=None, **changes):
    args = dict(positive=[[native.text.positive, {}]], negative=[[native.text.negative, {}]], identity=native.identity,
                vae=vae, width=96, height=64, length=9, identity_strength=1.0, start_percent=0.0, end_percent=1.0)
    return native.nodes.ConsisIDIdentityConditioning().encode(**{**args, **changes})


def _pack_error(name: str) -> type:
    import consisid_pack.consisid_core.errors as errors

    return getattr(errors, name)


def _image(shape, dtype=torch.float32, fill=0.5):
    return torch.full(shape, fill).to(dtype)


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(length=78), "length 78 does not fit this checkpoint: it must be 4·k + 1"),
        (dict(length=0), "length 0 does not fit this checkpoint"),
        (dict(length=393), "length 393 is over this checkpoint's maximum of 392 per pass (8 × its trained 49); pass "
                           "allow_oversize"),
        (dict(length=1025), "length 1025 is over this checkpoint's maximum of 392 per pass"),
        (dict(width=96.5), "width 96.5 must be a whole number"),
        (dict(width=100), "width 100 does not fit this checkpoint: it must be a positive multiple of 16"),
        (dict(width=4096, height=64), "width 4096 is over this checkpoint's maximum of 2880"),
        (dict(width=2048, height=1024), "2048×1024 is 2,097,152 pixels per frame, over this checkpoint's maximum"),
        (dict(height=-16), "height -16 does not fit this checkpoint"),
        (dict(identity_strength=math.nan), "identity_strength nan must be a finite number from 0 to 10"),
        (dict(identity_strength=math.inf), "identity_strength inf must be a finite number from 0 to 10"),
        (dict(identity_strength=11.0), "identity_strength 11.0 must be a finite number from 0 to 10"),
        (dict(start_percent=math.nan), "start_percent nan must be a finite number from 0 to 1"),
        (dict(end_percent=-math.inf), "end_percent -inf must be a finite number from 0 to 1"),
        (dict(start_percent=0.8, end_percent=0.2), "start_percent 0.8 is after end_percent 0.2; swap them"),
        (dict(first_frame_seed=-2), "first_frame_seed -2 must be a whole number from 0 to"),
        (dict(first_frame_seed=2**64), f"first_frame_seed {2**64} must be a whole number from 0 to"),
        (dict(identity="face.png"), "identity must be a ConsisID identity (Face Embed, Load Identity), found str"),
        (dict(start_image=_image((0, 64, 96, 3))), "the start_image (float32 [0, 64, 96, 3]) is not an IMAGE"),
        (dict(start_image=torch.tensor(0.5)), "the start_image (float32 []) is not an IMAGE"),
        (dict(start_image=_image((1, 0, 0, 3))), "the start_image (float32 [1, 0, 0, 3]) is not an IMAGE"),
        (dict(start_image=_image((1, 64, 96, 3), torch.uint8, 128)), "the start_image (uint8 [1, 64, 96, 3]) is not"),
        (dict(start_image=_image((1, 64, 96, 3), torch.bool, 1)), "the start_image (bool [1, 64, 96, 3]) is not"),
        (dict(start_image=_image((1, 64, 96, 3), torch.complex64)), "the start_image (complex64 [1, 64, 96, 3]) is"),
        (dict(start_image=_image((1, 64, 96, 5))), "the start_image (float32 [1, 64, 96, 5]) is not an IMAGE"),
        (dict(start_image=_image((1, 64, 96, 3), fill=math.nan)), "the start_image holds NaN or infinite pixels"),
        (dict(start_image=[[0.5]]), "the start_image (list) is not an IMAGE"),
        (dict(), "this VAE is a NoneType, not CogVideoX's: load the ConsisID checkpoint's vae"),
        (dict(allow_oversize=True, length=393), "this VAE is a NoneType"),  # past the bound when asked: on to the VAE
    ],
)
@pytest.mark.comfyui
@NEEDS_NATIVE
def test_identity_conditioning_refuses_bad_values_before_any_work(native, changes, says):
    refused(says, lambda: _encode(native, **changes), _pack_error("ConsisIDError"))


@pytest.mark.comfyui
@NEEDS_NATIVE
def test_a_vae_that_is_not_cogvideox_is_refused_by_conditioning_and_decode(native):
    import comfy.sd

    pixels = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    says = "this VAE is a PixelspaceConversionVAE, not CogVideoX's"
    refused(says, lambda: _encode(native, vae=pixels), _pack_error("ConsisIDError"))
    decode = native.nodes.ConsisIDNativeVAEDecode().decode
    refused(says, lambda: decode({"samples": torch.zeros(1, 16, 3, 8, 12)}, pixels), _pack_error("ConsisIDError"))


@pytest.fixture(scope="module")
def cogvideox_vae(native_vae_file):
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(native_vae_file)))
    vae.first_stage_model.float()
    vae.vae_dtype = torch.float32
    return vae


@pytest.mark.comfyui
@NEEDS_NATIVE
@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_grey_and_rgba_first_frames_are_taken_as_rgb(native, cogvideox_vae, channels):
    rgb = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(1))
    image = {1: rgb[..., :1], 2: torch.cat([rgb[..., :1], torch.ones(1, 64, 96, 1)], -1),
             4: torch.cat([rgb, torch.ones(1, 64, 96, 1)], -1)}[channels]
    expected = rgb if channels == 4 else rgb[..., :1].expand(1, 64, 96, 3)
    got = _encode(native, cogvideox_vae, start_image=image)[0][0][1]["concat_latent_image"]
    want = _encode(native, cogvideox_vae, start_image=expected.contiguous())[0][0][1]["concat_latent_image"]
    assert torch.equal(got, want)


@pytest.mark.comfyui
@NEEDS_NATIVE
@pytest.mark.slow
@pytest.mark.parametrize(
    "samples, says",
    [
        (torch.full((1, 16, 3, 8, 12), math.nan), "the LATENT: 'samples' holds NaN values: the sampling diverged; most often"),
        (torch.full((1, 16, 3, 8, 12), math.inf), "the LATENT: 'samples' holds infinite values"),
        (torch.zeros(0, 16, 3, 8, 12), "this LATENT (float32 [0, 16, 3, 8, 12]) is not a video latent [batch, channels, "
                                       "frames, h, w] of 16 channels with a frame in it"),
        (torch.zeros(1, 16, 8, 12), "this LATENT (float32 [1, 16, 8, 12]) is not a video latent"),
        (torch.zeros(1, 4, 3, 8, 12), "this LATENT (float32 [1, 4, 3, 8, 12]) is not a video latent"),
        (torch.zeros(1, 16, 3, 8, 12, dtype=torch.int32), "this LATENT (int32 [1, 16, 3, 8, 12]) is not"),
        ("latent", "this LATENT (str) is not a video latent"),
    ],
    ids=["nan", "inf", "empty-batch", "4-dims", "4-channels", "int", "str"],
)
def test_native_vae_decode_refuses_what_it_cannot_decode(native, cogvideox_vae, samples, says):
    decode = native.nodes.ConsisIDNativeVAEDecode().decode
    refused(says, lambda: decode({"samples": samples}, cogvideox_vae), _pack_error("ConsisIDError"))


def _sample(native, identity, model=None):
    import comfy.samplers

    positive, negative = native.nodes.identity_conditioned(
        [[native.text.positive, {}]], [[native.text.negative, {}]], identity, torch.zeros(1, 16, 1, 8, 12))
    empty = torch.zeros(1, 16, 3, 8, 12)
    model = model or native.model
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(6.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 2)
    noise = native.parts.ReferenceNoise(1).generate_noise({"samples": empty})
    return guider.sample(noise, empty, comfy.samplers.sampler_object("ddim"), sigmas, seed=1, disable_pbar=True)


@pytest.mark.comfyui
@NEEDS_NATIVE
@pytest.mark.slow
def test_a_vae_lacking_what_the_native_nodes_use_is_refused_by_name(native, cogvideox_vae):
    """The VAE's memory estimates are set on each instance (no probe sees them at load): checked where used."""
    import copy

    changed = copy.copy(cogvideox_vae)
    del changed.memory_used_decode
    refused("ConsisID Native VAE Decode needs ComfyUI internals that this ComfyUI", lambda: native.nodes.ConsisIDNativeVAEDecode()
            .decode({"samples": torch.zeros(1, 16, 3, 8, 12)}, changed), _pack_error("ConsisIDError"))
    refused("(comfy.sd.VAE lacks memory_used_decode)", lambda: native.nodes.ConsisIDNativeVAEDecode()
            .decode({"samples": torch.zeros(1, 16, 3, 8, 12)}, changed), _pack_error("ConsisIDError"))


@pytest.mark.comfyui
@NEEDS_NATIVE
def test_an_identity_of_other_widths_is_refused_at_sampling_with_the_packs_error(native):
    from consisid_pack.consisid_core.tiny import random_identity

    other = random_identity({**native.config, "LFE_id_dim": 100}, seed=1)
    refused("the identity does not fit this model: id_cond of width 100 and 5 hidden states", lambda: _sample(native, other),
            _pack_error("IdentityError"))


@pytest.mark.comfyui
@NEEDS_NATIVE
def test_a_step_that_turns_nan_is_named_not_sampled_on(native):
    """Face layers gone bad in memory (an fp16 overflow does this): the first step's NaN output is
    refused with its likely cause, not carried into a black video."""
    assert torch.isfinite(_sample(native, native.identity)).all()
    face = native.parts.face_patcher(native.model).model.module
    weight = face.perceiver_cross_attention[0].to_out.weight
    kept = weight.detach().clone()
    try:
        weight.data.fill_(math.nan)
        refused("ConsisID's transformer step: 'output' holds NaN values: the sampling diverged; most often half-precision",
                lambda: _sample(native, native.identity), _pack_error("ConsisIDError"))
    finally:
        weight.data.copy_(kept)
    assert torch.isfinite(_sample(native, native.identity)).all()


@pytest.mark.comfyui
@NEEDS_NATIVE
def test_seeds_and_strengths_given_by_a_script_are_checked(native):
    error = _pack_error("ConsisIDError")
    refused("noise_seed -1 must be a whole number from 0 to", lambda: native.nodes.ConsisIDNoise().get_noise(-1), error)
    refused(f"noise_seed {2**64} must be", lambda: native.nodes.ConsisIDDPMSampler().get_sampler(2**64), error)
    refused("LoRA strength nan must be a finite number",
            lambda: native.nodes.ConsisIDNativeLoRA().apply(native.model, "x.safetensors", math.nan), error)
    refused("text must be ConsisID Text Encode's output, found dict",
            lambda: native.nodes.ConsisIDTextConditioning().convert({}), error)
    refused("weight_dtype 'int8' is not one of default, fp32, bf16, fp16",
            lambda: native.nodes.ConsisIDNativeModelLoader().load("tiny", "int8"), error)
    refused("quantize 'q4_k' is not one of off, float8_e4m3fn",
            lambda: native.nodes.ConsisIDNativeModelLoader().load("tiny", "default", "q4_k"), error)


@pytest.mark.comfyui
@NEEDS_NATIVE
def test_cancel_reaches_the_face_layers_reader_through_comfyui(native, exported):
    """ComfyUI's own Cancel flag stops ConsisID Face Layers at its first Cancel point (the reader's
    between-tensors checks, `test_a_slow_build_stops_at_cancel`, are what make that point early)."""
    import comfy.model_management
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(exported[1].parent))
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            native.nodes.ConsisIDFaceModules().apply(native.model, exported[1].name)
    finally:
        comfy.model_management.interrupt_current_processing(False)


# ---------------------------------------------------------------------------------------------
# Through a real server's /prompt (ComfyUI v0.33.0): the cases a graph can bring

NATIVE = "tiny_native"
BAD_FACE_FILES = {
    "no_config": ({}, {"config": None}),
    "list_config": ({}, {"config": "[]"}),
    "null_config": ({}, {"config": "null"}),
    "bad_json_config": ({}, {"config": "{'"}),
    "deep_config": ({}, {"LFE_depth": 10**9}),
    "zero_interval": ({}, {"cross_attn_interval": 0}),
    "nan_scaling": ({}, {"scaling_factor": "nan"}),
    "inf_scaling": ({}, {"scaling_factor": "inf"}),
    "zero_scaling": ({}, {"scaling_factor": "0"}),
    "huge_channels": ({}, {"latent_channels": "1000000000"}),
    "beta_end": ({}, {"beta_end": 1e300}),
    "negative_timesteps": ({}, {"num_train_timesteps": -5}),
    "nan_weights": ("nan", {}),
    "huge_weights": ("huge", {}),
}
"""Face-modules files served to ConsisID Face Layers: (weights change, settings change), and what
each is refused with."""
BAD_FACE_SAYS = {
    "no_config": "has no 'config' setting", "list_config": "'config' setting must be a JSON object, found list",
    "null_config": "'config' setting must be a JSON object, found NoneType", "bad_json_config": "'config' setting is not JSON",
    "deep_config": "'LFE_depth' 1000000000 must be a whole number from 1 to 256",
    "zero_interval": "'cross_attn_interval' 0 must be a whole number from 1 to 512",
    "nan_scaling": "'scaling_factor' setting nan must be a finite number", "inf_scaling": "'scaling_factor' setting inf must be",
    "zero_scaling": "'scaling_factor' setting 0.0 must be", "huge_channels": "'latent_channels' setting 1000000000 must be",
    "beta_end": "'beta_end' 1e+300 must be a finite number from 0 to 1",
    "negative_timesteps": "'num_train_timesteps' -5 must be a whole number", "nan_weights": "holds NaN values",
    "huge_weights": "holds absurdly large", "empty": "is not a readable .safetensors file", "garbage": "is not a readable",
    "pickled": "is not a readable .safetensors file", "lying_header": "is not a readable .safetensors file",
}


def _served_face_files(folder, face) -> None:
    config, scheduler = config_of(face), None
    with safe_open(face, framework="pt") as f:
        scheduler = json.loads(f.metadata()["scheduler"])
    key, tensor = _one_key(face)
    for name, (weights, settings) in BAD_FACE_FILES.items():
        tensors = {key: torch.full_like(tensor, {"nan": math.nan, "huge": 1e30}[weights])} if weights else {}
        meta = {k: v for k, v in settings.items() if k in ("config", "scaling_factor", "latent_channels")}
        if set(settings) & set(config):
            meta["config"] = json.dumps({**config, **settings})
        if set(settings) & {"beta_end", "num_train_timesteps"}:
            meta["scheduler"] = json.dumps({**scheduler, **settings})
        face_file(folder / f"bad_{name}.safetensors", face, tensors, **meta)
    header = json.dumps({"local_facial_extractor.latents": {"dtype": "F32", "shape": [10**6, 10**6],
                                                             "data_offsets": [0, 16]}}).encode()
    (folder / "bad_empty.safetensors").write_bytes(b"")
    (folder / "bad_garbage.safetensors").write_bytes(bytes(range(256)) * 16)
    (folder / "bad_lying_header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    torch.save({"local_facial_extractor.latents": torch.zeros(1)}, folder / "bad_pickled.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, native_tiny_dir, native_vae_file):
    from consisid_core.identity import save_identity
    from consisid_core.tiny import random_identity
    from comfy_server import running
    from native_server import pack_and_inputs

    base = tmp_path_factory.mktemp("adversarial_native")
    tiny = base / "models" / "consisid" / NATIVE
    tiny.parent.mkdir(parents=True)
    tiny.symlink_to(native_tiny_dir, target_is_directory=True)
    models = base / "models" / "diffusion_models"
    models.mkdir(parents=True)
    _, face = export(tiny, models, "tiny")
    _served_face_files(models, face)
    with safe_open(tiny / "transformer" / WEIGHTS, framework="pt") as f:
        single = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**single, "proj_out.weight": torch.full_like(single["proj_out.weight"], math.nan)}, models / "nan_single.safetensors")
    save_file({**single, "local_facial_extractor.layers.999999999.0.norm1.weight": torch.zeros(32)},
              models / "deep_single.safetensors")
    (base / "models" / "vae").mkdir()
    (base / "models" / "vae" / "cogvideox_vae.safetensors").symlink_to(native_vae_file)
    config = Checkpoint.open(tiny).transformer_config
    pack_and_inputs(base, config)
    save_identity(random_identity({**config, "LFE_id_dim": 100}, 3), base / "input" / "other_identity.safetensors")
    for name, samples in (("nan", torch.full((1, 16, 3, 8, 12), math.nan)), ("empty", torch.zeros(0, 16, 3, 8, 12))):
        save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, base / "input" / f"{name}.latent")
    with running(base, ("--whitelist-custom-nodes", "consisid", "consisid_test_text")) as server:
        yield server


def _failed(server, prompt: dict, node_type: str, says: str, error: str = "ConsisIDError") -> str:
    """The prompt runs and stops at `node_type` with the pack's `error` in one line saying `says`."""
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error", result["status"]
    failure = next(m for kind, m in result["status"]["messages"] if kind == "execution_error")
    message = one_line(failure["exception_message"].strip())
    assert failure["node_type"] == node_type and failure["exception_type"].endswith("." + error), failure
    assert says in message, message
    return message


def _conditioning(identity="identity.safetensors", **inputs) -> dict:
    return {
        "conds": {"class_type": "TestTextConditioning", "inputs": {}},
        "identity": {"class_type": "ConsisIDLoadIdentity", "inputs": {"identity_file": identity}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "cogvideox_vae.safetensors"}},
        "cond": {"class_type": "ConsisIDIdentityConditioning",
                 "inputs": {"positive": ["conds", 0], "negative": ["conds", 1], "identity": ["identity", 0],
                            "vae": ["vae", 0], "width": 96, "height": 64, "length": 9, "identity_strength": 1.0,
                            "start_percent": 0.0, "end_percent": 1.0, **inputs}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["cond", 2], "filename_prefix": "adversarial"}},
    }


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
def test_a_size_past_its_declared_bound_is_one_error_on_its_own_field(server):
    status, answer = server.post("/prompt", {"prompt": _conditioning(width=5000)})
    assert status == 400, answer
    (error,) = answer["node_errors"]["cond"]["errors"]
    assert error["extra_info"]["input_name"] == "width" and error["type"] == "value_bigger_than_max", error


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
@pytest.mark.parametrize(
    "inputs, says",
    [
        (dict(length=78), "length 78 does not fit this checkpoint: it must be 4·k + 1"),
        (dict(width=4096, height=64), "width 4096 is over this checkpoint's maximum of 2880"),
        (dict(identity_strength=math.nan), "identity_strength nan must be a finite number from 0 to 10"),
        (dict(start_percent=math.nan), "start_percent nan must be a finite number from 0 to 1"),
        (dict(start_percent=0.9, end_percent=0.1), "start_percent 0.9 is after end_percent 0.1; swap them"),
    ],
)
def test_identity_conditioning_numbers_from_a_prompt(server, inputs, says):
    _failed(server, _conditioning(**inputs), "ConsisIDIdentityConditioning", says)


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
def test_a_pixel_space_vae_is_refused_by_identity_conditioning(server):
    prompt = _conditioning()
    prompt["vae"]["inputs"]["vae_name"] = "pixel_space"
    _failed(server, prompt, "ConsisIDIdentityConditioning", "this VAE is a PixelspaceConversionVAE, not CogVideoX's")


def _face_layers(name: str) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_transformer.safetensors", "weight_dtype": "default"}},
        "model": {"class_type": "ConsisIDFaceModules", "inputs": {"model": ["unet", 0], "face_layers": name}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 2,
                                                              "denoise": 1.0}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["sigmas", 0]}},
    }


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
@pytest.mark.parametrize("name", sorted(BAD_FACE_SAYS))
def test_a_bad_face_layers_file_from_a_prompt(server, name):
    _failed(server, _face_layers(f"bad_{name}.safetensors"), "ConsisIDFaceModules", BAD_FACE_SAYS[name], "CheckpointError")


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
@pytest.mark.parametrize("name, says", [("nan_single", "'proj_out.weight' holds NaN values"),
                                        ("deep_single", "'LFE_depth' 1000000000 must be a whole number from 1 to 256")])
def test_a_bad_single_file_transformer_from_a_prompt(server, name, says):
    prompt = _face_layers("tiny_face.safetensors")
    prompt["model"] = {"class_type": "ConsisIDNativeModelLoader",
                       "inputs": {"model": f"diffusion_models/{name}.safetensors", "weight_dtype": "fp32"}}
    del prompt["unet"]
    _failed(server, prompt, "ConsisIDNativeModelLoader", says, "CheckpointError")


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
@pytest.mark.parametrize("name, says", [("nan", "the LATENT: 'samples' holds NaN values: the sampling diverged"),
                                        ("empty", "this LATENT (float32 [0, 16, 3, 8, 12]) is not a video latent")])
def test_native_vae_decode_of_a_bad_latent_from_a_prompt(server, name, says):
    prompt = {
        "latent": {"class_type": "LoadLatent", "inputs": {"latent": f"{name}.latent"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "cogvideox_vae.safetensors"}},
        "decode": {"class_type": "ConsisIDNativeVAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["vae", 0]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    _failed(server, prompt, "ConsisIDNativeVAEDecode", says)


@pytest.mark.comfyui
@pytest.mark.slow
@NEEDS_NATIVE
def test_an_identity_of_other_widths_from_a_prompt(server):
    prompt = _conditioning("other_identity.safetensors") | {
        "model": {"class_type": "ConsisIDNativeModelLoader", "inputs": {"model": NATIVE, "weight_dtype": "fp32"}},
        "sample": {"class_type": "KSampler",
                   "inputs": {"model": ["model", 0], "seed": 1, "steps": 1, "cfg": 6.0, "sampler_name": "euler",
                              "scheduler": "simple", "positive": ["cond", 0], "negative": ["cond", 1],
                              "latent_image": ["cond", 2], "denoise": 1.0}},
    }
    prompt["save"]["inputs"]["samples"] = ["sample", 0]
    _failed(server, prompt, "KSampler", "the identity does not fit this model: id_cond of width 100", "IdentityError")
    status, _ = server.post("/prompt", {"prompt": _conditioning()})
    assert status == 200  # and the server takes the next prompt
