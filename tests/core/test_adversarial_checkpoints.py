"""Adversarial checkpoint folders and model files, built in the real formats.

Every wrong folder or file gets our own error (CheckpointError / FaceError, not a traceback), in
one line that names the value and the fix, before it costs the memory or the reads it could:
configs are refused by `Checkpoint.open` before any weights are read, index files never lead
outside their folder, weights with NaN / Inf / absurd values or missing tensors are refused at
load, face model files that would run code or build a huge model are refused unread or unbuilt.
Nothing is written by a refused load.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consisid_core.checkpoint import MAX_JSON_BYTES, Checkpoint
from consisid_core.checks import class_defaults
from consisid_core.errors import CheckpointError, FaceError
from consisid_core.face import load_face_models
from consisid_core.single_file import load_transformer_file, load_vae_file, model_from_files
from consisid_core.text import load_text_encoder
from refusals import assert_refused

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_FILES = {"transformer": WEIGHTS, "vae": WEIGHTS, "text_encoder": "model.safetensors"}
CONFIG_FIX = "use the checkpoint's original config.json"
DAMAGED_FIX = "download or convert it again"


# ---------------------------------------------------------------------------------------------
# helpers


def _re(value) -> str:
    """`value` (a path, a tensor name) as a literal in a `match` pattern."""
    return re.escape(str(value))


def refused(error: type, match: str, call, watch: Path) -> str:
    """`assert_refused`, exactly `error`, nothing under `watch` changed."""
    return assert_refused(call, match, error, exact=True, unchanged=watch)


def _save(state: dict, path: Path) -> None:
    save_file(state, path, metadata={"format": "pt"})  # what diffusers and transformers write


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A copy of the session's tiny checkpoint (never modified itself), without the face models."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, root, ignore=shutil.ignore_patterns("face_encoder"))
    return root


@pytest.fixture
def weights_watched(ckpt, sentinels) -> Path:
    """`ckpt` with its three weight files replaced by links to sentinel files: a test fails if
    anything reads them (how `Checkpoint.open` is shown to refuse before loading weights)."""
    for component, name in WEIGHT_FILES.items():
        path = ckpt / component / name
        target = sentinels.make(f"{component}-{name}", b"weights that must not be read")
        path.unlink()
        path.symlink_to(target)
    return ckpt


def _reference_state(tiny_dir: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(tiny_dir / component / WEIGHT_FILES[component])


# ---------------------------------------------------------------------------------------------
# configs: refused by Checkpoint.open, before any weights are read


T = ("transformer", "config.json")
V = ("vae", "config.json")
S = ("scheduler", "scheduler_config.json")
CONFIG_CASES = [
    # (component, file, key, value, message fragment naming the value)
    (*T, "num_layers", [1], r"'num_layers' \[1\] must be a whole number from 1 to 512"),
    (*T, "num_layers", "2", r"'num_layers' '2' must be a whole number"),
    (*T, "num_layers", None, r"'num_layers' None must be a whole number"),
    (*T, "num_layers", True, r"'num_layers' True must be a whole number"),
    (*T, "num_layers", -2, r"'num_layers' -2 must be a whole number from 1 to 512"),
    (*T, "num_layers", 2.5, r"'num_layers' 2.5 must be a whole number written without a decimal point"),
    (*T, "num_layers", 2.0, r"'num_layers' 2.0 must be a whole number written without a decimal point"),
    (*T, "patch_size", 0, r"'patch_size' 0 must be a whole number from 1 to 64"),
    (*T, "sample_frames", None, r"'sample_frames' None must be a whole number from 1 to 1024"),
    (*T, "max_text_seq_length", 512, r"'max_text_seq_length' 512 must be a whole number from 226 to 226"),
    (*T, "max_text_seq_length", 77, r"'max_text_seq_length' 77 must be"),
    (*T, "norm_eps", math.nan, r"'norm_eps' nan must be a finite number"),
    (*T, "local_face_scale", math.inf, r"'local_face_scale' inf must be a finite number"),
    (*T, "is_kps", 1, r"'is_kps' is 1, expected true or false"),
    (*T, "activation_fn", "relu6", r"'activation_fn' is 'relu6', expected one of 'gelu'"),
    (*T, "LFE_num_scale", 4, r"LFE_depth 5 is not a multiple of LFE_num_scale 4"),
    (*T, "cross_attn_interval", 3, r"num_layers 2 is not a multiple of cross_attn_interval 3"),
    (*V, "block_out_channels", "32", r"'block_out_channels' is '32', expected a list of 1 to 8 whole numbers"),
    (*V, "block_out_channels", [32, 32], r"block_out_channels, down_block_types and up_block_types must be lists "
                                         r"of the same length"),
    (*V, "latent_channels", 0, r"'latent_channels' 0 must be a whole number from 1 to 1024"),
    (*V, "scaling_factor", "0.7", r"'scaling_factor' '0.7' must be a finite number"),
    (*S, "num_train_timesteps", "1000", r"'num_train_timesteps' '1000' must be a whole number"),
    (*S, "beta_end", None, r"'beta_end' None must be a finite number from 0 to 1"),
    (*S, "beta_schedule", "cosine", r"'beta_schedule' is 'cosine', expected one of 'linear', 'scaled_linear'"),
    (*S, "timestep_spacing", "middle", r"'timestep_spacing' is 'middle', expected one of 'linspace', 'leading'"),
    (*S, "prediction_type", "x0", r"'prediction_type' is 'x0', expected one of 'epsilon'"),
    (*S, "trained_betas", [1e9], r"'trained_betas' is \[1000000000.0\], expected one of null"),
]


@pytest.mark.parametrize(
    "component,fname,key,value,message", CONFIG_CASES, ids=[f"{c[0]}-{c[2]}={c[3]!r}" for c in CONFIG_CASES]
)
def test_config_values_are_refused_by_open_before_any_weights_are_read(
    weights_watched, component, fname, key, value, message
):
    path = weights_watched / component / fname
    _edit_json(path, **{key: value})
    text = refused(CheckpointError, message, lambda: Checkpoint.open(weights_watched), weights_watched)
    assert str(path) in text and CONFIG_FIX in text


@pytest.mark.parametrize("component,fname", [("transformer", "config.json"), ("vae", "config.json"),
                                             ("scheduler", "scheduler_config.json"), (".", "model_index.json")])
def test_a_config_that_is_a_json_list(weights_watched, component, fname):
    path = weights_watched / component / fname
    path.write_text("[1, 2, 3]")
    refused(CheckpointError, r"must hold a JSON object of settings, found a list",
            lambda: Checkpoint.open(weights_watched), weights_watched)


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"num_layers": 2', r"Expecting ',' delimiter"),
        (b"\xff\xfe{}", r"codec can't decode byte 0xff"),
        (b"[" * 100_000 + b"]" * 100_000, r"maximum recursion depth exceeded"),
        (b"", r"Expecting value"),
    ],
    ids=["truncated", "not-utf8", "deeply-nested", "empty"],
)
def test_a_config_that_is_not_readable_json(weights_watched, content, message):
    path = weights_watched / "transformer" / "config.json"
    path.write_bytes(content)
    refused(CheckpointError, rf"config.json' is not a readable JSON file \(.*{message}",
            lambda: Checkpoint.open(weights_watched), weights_watched)


def test_a_config_diffusers_cannot_build_is_refused_in_one_line(ckpt):
    """Rotary embeddings off and learned ones on: diffusers raises its own multi-line ValueError."""
    _edit_json(ckpt / "transformer" / "config.json", use_rotary_positional_embeddings=False,
               use_learned_positional_embeddings=True)
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, r"transformer' does not load as a ConsisIDTransformer3DModel: There are no ConsisID "
            r"checkpoints available with disable rotary embeddings", lambda: checkpoint.load_transformer("fp32"), ckpt)
    path = ckpt / "transformer" / WEIGHTS
    config = json.loads((ckpt / "transformer" / "config.json").read_text())
    refused(CheckpointError, r"the ConsisID transformer config for '.*' does not build: There are no ConsisID "
            r"checkpoints.*; pass the checkpoint's config", lambda: load_transformer_file(path, "fp32", config), ckpt)


def test_a_billion_layers_is_refused_at_once(weights_watched):
    _edit_json(weights_watched / "transformer" / "config.json", num_layers=1_000_000_000)
    start = time.perf_counter()
    refused(CheckpointError, r"'num_layers' 1000000000 must be a whole number from 1 to 512",
            lambda: Checkpoint.open(weights_watched), weights_watched)
    assert time.perf_counter() - start < 5


def test_an_int_beyond_any_float_is_refused_in_a_short_line(weights_watched):
    path = weights_watched / "transformer" / "config.json"
    path.write_text(path.read_text().replace('"num_layers": 2', '"num_layers": 1' + "0" * 400))
    assert json.loads(path.read_text())["num_layers"] == 10**400
    text = refused(CheckpointError, r"'num_layers' 1000000000.*… must be a whole number from 1 to 512",
                   lambda: Checkpoint.open(weights_watched), weights_watched)
    assert len(text) < 400


def test_a_2_mb_config_is_refused_unread(ckpt, sentinels):
    config = ckpt / "transformer" / "config.json"
    padded = json.loads(config.read_text()) | {"comment": "x" * (2 * 2**20)}
    target = sentinels.make("big-config.json", json.dumps(padded).encode())
    assert target.stat().st_size > MAX_JSON_BYTES
    config.unlink()
    config.symlink_to(target)
    refused(CheckpointError, r"config.json' is over 1024 kB: not a config or index file; use the checkpoint's original",
            lambda: Checkpoint.open(ckpt), ckpt)


def test_keys_diffusers_has_defaults_for_may_be_left_out(ckpt, tiny_model):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, ConsisIDTransformer3DModel

    dropped = {}
    for component, fname, cls in (
        ("transformer", "config.json", ConsisIDTransformer3DModel),
        ("vae", "config.json", AutoencoderKLCogVideoX),
        ("scheduler", "scheduler_config.json", CogVideoXDPMScheduler),
    ):
        path = ckpt / component / fname
        config = json.loads(path.read_text())
        defaults = class_defaults(cls)
        dropped[component] = [k for k, v in config.items() if not k.startswith("_") and defaults.get(k, ...) == v]
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in dropped[component]}))
    assert {"max_text_seq_length", "patch_size", "activation_fn", "LFE_num_scale"} <= set(dropped["transformer"])
    assert {"norm_num_groups", "act_fn", "temporal_compression_ratio"} <= set(dropped["vae"])
    assert {"num_train_timesteps", "beta_start", "steps_offset"} <= set(dropped["scheduler"])

    model = Checkpoint.open(ckpt).load_model("fp32")
    assert model.config.max_text_seq_length == 226 and model.config.patch_size == 2
    reference = tiny_model.transformer.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.transformer.state_dict().items())
    assert model.vae.config.norm_num_groups == 32


def test_a_config_with_fewer_layers_than_its_weights_is_said(ckpt, caplog):
    """diffusers drops the second layer's weights: loading says so (a released folder carrying an
    extra tensor must still load, so this is a warning, not a refusal)."""
    _edit_json(ckpt / "transformer" / "config.json", num_layers=1, cross_attn_interval=1)
    with caplog.at_level("WARNING", logger="consisid_core.checkpoint"):
        transformer = Checkpoint.open(ckpt).load_transformer("fp32")
    assert len(transformer.transformer_blocks) == 1
    (record,) = [r for r in caplog.records if "has no place for" in r.getMessage()]
    assert "(perceiver_cross_attention.1." in record.getMessage() and "\n" not in record.getMessage()


# ---------------------------------------------------------------------------------------------
# sharded weights: the index


def _shard(root: Path, component: str = "transformer") -> tuple[Path, dict]:
    """Split a component's weights into two .safetensors shards and an index, as the Hub does."""
    name = WEIGHT_FILES[component]
    folder = root / component
    state = load_file(folder / name)
    keys = sorted(state)
    stem = name.removesuffix(".safetensors")
    shards = [f"{stem}-00001-of-00002.safetensors", f"{stem}-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for shard, part in zip(shards, halves):
        _save({k: state[k] for k in part}, folder / shard)
    (folder / name).unlink()
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, part in zip(shards, halves) for k in part}}
    index_path = folder / f"{name}.index.json"
    index_path.write_text(json.dumps(index))
    return index_path, index


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_sharded_weights_load_the_same_tensors(ckpt, tiny_dir, component):
    _shard(ckpt, component)
    checkpoint = Checkpoint.open(ckpt)
    loaded = {
        "transformer": lambda: checkpoint.load_transformer("fp32"),
        "vae": lambda: checkpoint.load_vae("fp32"),
        "text_encoder": lambda: load_text_encoder(checkpoint, "fp32").model,
    }[component]()
    reference = _reference_state(tiny_dir, component)
    ours = loaded.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.items() if k in ours)


def test_shards_that_are_pickled_bin_files(ckpt):
    index_path, index = _shard(ckpt)
    index["weight_map"] = {k: v.replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    refused(CheckpointError, r"names the shard 'diffusion_pytorch_model-00001-of-00002.bin', which is not a "
            r"\.safetensors file: pickled shards are not loaded for safety; convert them to \.safetensors",
            lambda: Checkpoint.open(ckpt), ckpt)


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_shard_outside_the_folder_is_never_read(ckpt, sentinels, how):
    index_path, index = _shard(ckpt)
    first = next(iter(index["weight_map"].values()))
    outside = sentinels.make("elsewhere/stolen.safetensors", (index_path.parent / first).read_bytes())
    name = os.path.relpath(outside, index_path.parent) if how == "relative" else str(outside)
    assert (index_path.parent / name).resolve() == outside.resolve()
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    refused(CheckpointError, r"names the shard '.*stolen.safetensors' outside its folder; only files beside it load",
            lambda: Checkpoint.open(ckpt), ckpt)


def test_a_missing_shard(ckpt):
    index_path, index = _shard(ckpt)
    (index_path.parent / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    refused(CheckpointError, r"names the shard 'diffusion_pytorch_model-00002-of-00002.safetensors', which is "
            r"missing; download it again", lambda: Checkpoint.open(ckpt), ckpt)


@pytest.mark.parametrize("weight_map", ["absent", [], {}, "text"])
def test_an_index_without_a_weight_map(ckpt, weight_map):
    index_path, index = _shard(ckpt)
    if weight_map == "absent":
        del index["weight_map"]
    else:
        index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    refused(CheckpointError, r"index.json' has no weight_map of tensor names to shard files; download it again",
            lambda: Checkpoint.open(ckpt), ckpt)


def test_a_shard_name_with_a_newline_is_shown_on_one_line(ckpt):
    index_path, index = _shard(ckpt)
    index["weight_map"] = {k: "evil\nname.safetensors" for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    refused(CheckpointError, r"names the shard 'evil\\nname.safetensors', which is missing",
            lambda: Checkpoint.open(ckpt), ckpt)


def test_an_index_that_leaves_a_tensor_out(ckpt):
    """diffusers fills a tensor the index does not name with random values: refused instead."""
    index_path, index = _shard(ckpt)
    del index["weight_map"]["proj_out.bias"]
    index_path.write_text(json.dumps(index))
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, r"does not load as a ConsisIDTransformer3DModel: its weights and config.json do not "
            r"match, tensors 1 missing \(proj_out.bias\)", lambda: checkpoint.load_transformer("fp32"), ckpt)


# ---------------------------------------------------------------------------------------------
# weights: NaN, Inf, absurd values, missing tensors


POISONED = {
    "transformer": "local_facial_extractor.id_embedding_mapping.0.weight",
    "vae": "decoder.conv_out.conv.weight",
    "text_encoder": "encoder.block.1.layer.0.SelfAttention.k.weight",
}
VALUES = [(math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite"), (1e38, r"absurdly large \(1e\+38\)")]


def _poison(path: Path, key: str, value: float) -> None:
    state = load_file(path)
    tensor = state[key].clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    state[key] = tensor
    _save(state, path)


def _load_component(checkpoint: Checkpoint, component: str, dtype: str = "fp32"):
    return {
        "transformer": checkpoint.load_transformer,
        "vae": checkpoint.load_vae,
        "text_encoder": lambda dtype: load_text_encoder(checkpoint, dtype),
    }[component](dtype)


@pytest.mark.parametrize("value,described", VALUES, ids=["nan", "inf", "-inf", "1e38"])
@pytest.mark.parametrize("component", list(POISONED))
def test_poisoned_weights_are_refused_at_load(ckpt, component, value, described):
    key = POISONED[component]
    _poison(ckpt / component / WEIGHT_FILES[component], key, value)
    checkpoint = Checkpoint.open(ckpt)  # the values are in the weights: found when they load
    refused(CheckpointError, rf"'{_re(ckpt / component)}': '{_re(key)}' holds {described} values: the file is damaged; "
            f"{DAMAGED_FIX}", lambda: _load_component(checkpoint, component), ckpt)


@pytest.mark.parametrize("dtype,described", [("bf16", r"absurdly large \(9.97e\+37\)"), ("fp16", "infinite")])
def test_poisoned_weights_are_refused_in_half_precision(ckpt, dtype, described):
    key = POISONED["transformer"]
    _poison(ckpt / "transformer" / WEIGHTS, key, 1e38)
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, rf"'{_re(key)}' holds {described} values",
            lambda: checkpoint.load_transformer(dtype), ckpt)


def test_poisoned_vae_is_refused_by_load_model(ckpt):
    _poison(ckpt / "vae" / WEIGHTS, POISONED["vae"], math.nan)
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, rf"'{_re(POISONED['vae'])}' holds NaN values: the file is damaged; {DAMAGED_FIX}",
            lambda: checkpoint.load_model("fp32"), ckpt)


@pytest.mark.parametrize("value,described", VALUES, ids=["nan", "inf", "-inf", "1e38"])
@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_poisoned_single_files_are_refused(ckpt, component, value, described):
    path = ckpt / component / WEIGHTS
    _poison(path, POISONED[component], value)
    load = load_transformer_file if component == "transformer" else load_vae_file
    refused(CheckpointError, rf"'{_re(path)}': '{_re(POISONED[component])}' holds {described} values: the file is "
            f"damaged; {DAMAGED_FIX}", lambda: load(path, "fp32"), ckpt)


def test_poisoned_single_file_is_refused_by_model_from_files(ckpt):
    path = ckpt / "transformer" / WEIGHTS
    _poison(path, POISONED["transformer"], -math.inf)
    refused(CheckpointError, rf"'{_re(POISONED['transformer'])}' holds infinite values",
            lambda: model_from_files(path, ckpt / "vae" / WEIGHTS, "fp32"), ckpt)


@pytest.mark.parametrize(
    "component,key",
    [("transformer", "proj_out.bias"), ("transformer", "local_facial_extractor.latents"),
     ("vae", "decoder.conv_out.conv.weight"), ("text_encoder", "encoder.block.0.layer.0.layer_norm.weight")],
)
def test_weights_missing_a_tensor_are_refused_at_load(ckpt, component, key):
    """Left on the meta device (diffusers) or filled with random values (transformers) otherwise."""
    path = ckpt / component / WEIGHT_FILES[component]
    state = load_file(path)
    del state[key]
    _save(state, path)
    checkpoint = Checkpoint.open(ckpt)
    text = refused(CheckpointError, rf"its weights and config.json do not match, tensors 1 missing \({_re(key)}\)",
                   lambda: _load_component(checkpoint, component), ckpt)
    assert "download the folder again" in text


def test_single_file_missing_a_tensor(ckpt):
    path = ckpt / "transformer" / WEIGHTS
    state = load_file(path)
    del state["proj_out.bias"]
    _save(state, path)
    for config in (None, ckpt):  # inferred from the shapes, or the folder's
        refused(CheckpointError, r"do not match their config: keys 1 missing \(proj_out.bias\); "
                r"pass the ConsisID transformer config of the checkpoint this file came from",
                lambda: load_transformer_file(path, "fp32", config), ckpt)


# ---------------------------------------------------------------------------------------------
# damaged files and keys or shapes of another model


@pytest.mark.parametrize("damage", ["random", "half", "header-only", "empty"])
@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_damaged_safetensors_in_a_folder(ckpt, component, damage):
    path = ckpt / component / WEIGHT_FILES[component]
    data = path.read_bytes()
    path.write_bytes({
        "random": random.Random(1).randbytes(4096),
        "half": data[: len(data) // 2],
        "header-only": data[: 8 + int.from_bytes(data[:8], "little")],
        "empty": b"",
    }[damage])
    checkpoint = Checkpoint.open(ckpt)
    cls = {"transformer": "ConsisIDTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
           "text_encoder": "T5EncoderModel"}[component]
    refused(CheckpointError, rf"'{_re(ckpt / component)}' does not load as a {cls}: ",
            lambda: _load_component(checkpoint, component), ckpt)


@pytest.mark.parametrize("damage", ["random", "half", "huge-header-length", "huge-tensor-in-header", "bad-dtype"])
@pytest.mark.parametrize("load", [load_transformer_file, load_vae_file], ids=["transformer", "vae"])
def test_damaged_single_files(ckpt, load, damage):
    path = ckpt / "transformer" / WEIGHTS
    data = path.read_bytes()

    def header(entries: dict, payload: bytes) -> bytes:
        text = json.dumps(entries).encode()
        return len(text).to_bytes(8, "little") + text + payload

    path.write_bytes({
        "random": random.Random(2).randbytes(4096),
        "half": data[: len(data) // 2],
        "huge-header-length": (2**60).to_bytes(8, "little") + b"{}",
        "huge-tensor-in-header": header(
            {"patch_embed.proj.weight": {"dtype": "F32", "shape": [10**6, 10**6, 2, 2], "data_offsets": [0, 16]}},
            bytes(16),
        ),
        "bad-dtype": header(
            {"patch_embed.proj.weight": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
        ),
    }[damage])
    refused(CheckpointError, rf"'{_re(path)}' is not a readable \.safetensors file \(",
            lambda: load(path, "fp32"), ckpt)


ARABIC_ONE = "\u0661"  # '١', a digit to str.isdigit() and int(), not to [0-9]


@pytest.mark.parametrize(
    "old,number",
    [
        ("transformer_blocks.1.", ARABIC_ONE),
        ("transformer_blocks.1.", "01"),
        ("transformer_blocks.1.", "\uff11"),  # fullwidth 1
        ("local_facial_extractor.layers.1.", ARABIC_ONE),
        ("local_facial_extractor.mapping_1.", ARABIC_ONE),
        ("perceiver_cross_attention.1.", ARABIC_ONE),
    ],
    ids=["arabic-digit", "leading-zero", "fullwidth-digit", "arabic-lfe-layer", "arabic-scale", "arabic-cross-attn"],
)
def test_single_file_keys_numbered_another_way(ckpt, old, number):
    """Counted by [0-9]+ alone, such keys would make the inferred model smaller than the file."""
    path = ckpt / "transformer" / WEIGHTS
    new = old.replace("1", number)
    _save({k.replace(old, new): v for k, v in load_file(path).items()}, path)
    inferred = rf"have the key '{_re(new)}[^']*', numbered '{_re(number)}' where diffusers writes 0, 1, 2, …: " \
        r"use a ConsisID file with diffusers key names"
    refused(CheckpointError, inferred, lambda: load_transformer_file(path, "fp32"), ckpt)
    text = refused(CheckpointError, rf"missing \({_re(old)}.*unexpected \({_re(new)}",
                   lambda: load_transformer_file(path, "fp32", ckpt), ckpt)  # the folder's config
    assert "config of the checkpoint this file came from" in text


def test_folder_keys_with_digits_of_another_kind(ckpt):
    path = ckpt / "transformer" / WEIGHTS
    renamed = f"transformer_blocks.{ARABIC_ONE}."
    _save({k.replace("transformer_blocks.1.", renamed): v for k, v in load_file(path).items()}, path)
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, r"24 missing \(transformer_blocks\.1\.",
            lambda: checkpoint.load_transformer("fp32"), ckpt)


def test_a_single_file_config_diffusers_would_fail_an_assert_on(ckpt):
    path = ckpt / "transformer" / WEIGHTS
    config = json.loads((ckpt / "transformer" / "config.json").read_text()) | {"LFE_num_scale": 4}
    refused(CheckpointError, rf"'the config for {_re(WEIGHTS)}': LFE_depth 5 is not a multiple of LFE_num_scale 4; "
            f"{CONFIG_FIX}",
            lambda: load_transformer_file(path, "fp32", config), ckpt)


@pytest.mark.parametrize(
    "key,shape,config,message",
    [
        ("patch_embed.proj.weight", (64,), None, r"have shapes no ConsisID model has \(not enough values to unpack"),
        ("patch_embed.proj.weight", (64, 8, 2, 2, 1), None, r"have shapes no ConsisID model has \(too many values"),
        ("transformer_blocks.0.attn1.norm_q.weight", (), None, r"have shapes no ConsisID model has \(tuple index"),
        ("transformer_blocks.0.attn1.norm_q.weight", (0,), None, r"have shapes no ConsisID model has \(integer div"),
        ("local_facial_extractor.latents", (4, 32), None, r"have shapes no ConsisID model has \(not enough values"),
        ("proj_out.bias", (4, 1), "folder", r"1 of the wrong shape \(proj_out.bias: \[4, 1\], expected \[16\]\)"),
        ("proj_out.weight", (16,), "folder", r"1 of the wrong shape \(proj_out.weight: \[16\], expected \[16, 64\]\)"),
    ],
)
def test_single_file_shapes_of_the_wrong_rank(ckpt, key, shape, config, message):
    path = ckpt / "transformer" / WEIGHTS
    _save(load_file(path) | {key: torch.zeros(shape)}, path)
    text = refused(CheckpointError, message,
                   lambda: load_transformer_file(path, "fp32", ckpt if config else None), ckpt)
    assert "use a ConsisID file" in text or "config of the checkpoint this file came from" in text


def test_vae_single_file_shapes_of_the_wrong_rank(ckpt):
    path = ckpt / "vae" / WEIGHTS
    _save(load_file(path) | {"encoder.conv_in.conv.weight": torch.zeros(3)}, path)
    refused(CheckpointError, r"have shapes no ConsisID model has \(tuple index out of range\); use a ConsisID file",
            lambda: load_vae_file(path, "fp32"), ckpt)


def test_a_tensor_name_with_a_newline_is_shown_on_one_line(ckpt):
    path = ckpt / "transformer" / WEIGHTS
    _save(load_file(path) | {"evil\nname": torch.zeros(1)}, path)
    refused(CheckpointError, r"1 unexpected \(evil\\nname\)", lambda: load_transformer_file(path, "fp32", ckpt), ckpt)


# ---------------------------------------------------------------------------------------------
# face_encoder files, through load_face_models


EVA = "EVA02_CLIP_L_336_psz14_s6B.pt"
RETINAFACE = "detection_Resnet50_Final.pth"
BISENET = "parsing_bisenet.pth"
DETECTOR = "models/antelopev2/scrfd_10g_bnkps.onnx"
RECOGNISER = "models/antelopev2/glintr100.onnx"


class SubclassedDict(collections.OrderedDict):
    """A dict subclass: pickled by class name, so weights_only refuses it."""


class Payload:
    def __init__(self):
        self.note = "would run on load"


@pytest.fixture
def faces(tiny_dir, tmp_path) -> Path:
    folder = tmp_path / "face_encoder"
    shutil.copytree(tiny_dir / "face_encoder", folder)
    return folder


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _face_refused(folder: Path, match: str, error=FaceError) -> str:
    text = refused(error, match, lambda: load_face_models(folder), folder.parent)
    assert "weights_only=False" not in text
    return text


def test_the_face_models_load_from_the_copy(faces):
    assert load_face_models(faces).id_dim == 544  # what the refusals below differ from


@pytest.mark.parametrize("fname", [EVA, RETINAFACE, BISENET])
@pytest.mark.parametrize("seed", [0, 2, 20, 195], ids=["unpickling", "index", "key", "unicode"])
def test_random_bytes_as_a_torch_file(faces, fname, seed):
    """Random bytes fail in torch's unpickler in several ways (UnpicklingError, IndexError,
    KeyError, UnicodeDecodeError, by seed): each is a damaged file, never 'pickled objects'."""
    (faces / fname).write_bytes(random.Random(seed).randbytes(4096))
    text = _face_refused(faces, rf"'{_re(faces / fname)}' is not a readable PyTorch weights file, damaged or truncated "
                         r"\(.*\); download it again")
    assert "pickled Python objects" not in text


@pytest.mark.parametrize("cut", ["half", "100 bytes", "empty"])
def test_truncated_eva_zip(faces, cut):
    path = faces / EVA
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "100 bytes": data[:100], "empty": b""}[cut])
    _face_refused(faces, rf"'{_re(path)}' is not a readable PyTorch weights file, damaged or truncated \(.+\); "
                  "download it again")


@pytest.mark.parametrize(
    "fname,build",
    [
        (EVA, lambda state: SubclassedDict(state)),
        (EVA, lambda state: state | {"visual.extra": Payload()}),
        (RETINAFACE, lambda state: {"state_dict": SubclassedDict(state)}),
        (BISENET, lambda state: state | {"note": Payload()}),
    ],
    ids=["eva-dict-subclass", "eva-object", "retinaface-dict-subclass", "bisenet-object"],
)
def test_pickled_python_objects_are_never_loaded(faces, fname, build):
    path = faces / fname
    torch.save(build(_state(path)), path)
    text = _face_refused(faces, rf"'{_re(path)}' is not a plain weights file: it holds pickled Python objects, "
                         r"which are never loaded \(they could run code\); use the original file from the ConsisID "
                         "checkpoint")
    assert "weights_only" not in text


def test_a_pickle_that_calls_a_function(faces):
    witness = faces.parent / "ran"
    (faces / RETINAFACE).write_bytes(f"cos\nsystem\n(S'touch {witness}'\ntR.".encode())  # os.system(...), protocol 0
    _face_refused(faces, r"is not a plain weights file: it holds pickled Python objects")
    assert not witness.exists()


@pytest.mark.parametrize("value,described", VALUES, ids=["nan", "inf", "-inf", "1e38"])
@pytest.mark.parametrize("fname", [RETINAFACE, BISENET, EVA])
def test_face_weights_with_nan_inf_or_absurd_values(faces, fname, value, described):
    path = faces / fname
    state = _state(path)
    key = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)[0]
    if state[key].dtype == torch.float16 and value == 1e38:  # the tiny parser is stored in float16
        described = "infinite"
    tensor = state[key].clone()
    tensor.view(-1)[1] = value
    state[key] = tensor
    torch.save(state, path)
    _face_refused(faces, rf"'{_re(path)}': '{_re(key)}' holds {described} values: the file is damaged; download the "
                  "face_encoder folder again")


def test_a_face_tensor_name_with_a_newline(faces):
    path = faces / RETINAFACE
    torch.save(_state(path) | {"evil\nname": torch.tensor([math.nan, 1.0])}, path)
    _face_refused(faces, r"'evil\\nname' holds NaN values")


@pytest.mark.parametrize(
    "fname,edit,message",
    [
        (RETINAFACE, lambda s: {k: v for k, v in s.items() if k != "BboxHead.2.conv1x1.weight"},
         r"does not fit facexlib RetinaFace \(mobile0.25\): tensors 1 missing \(BboxHead.2.conv1x1.weight\)"),
        (RETINAFACE, lambda s: s | {"BboxHead.2.conv1x1.weight": torch.zeros(3, 3)},
         r"1 of the wrong shape \(BboxHead.2.conv1x1.weight: \[3, 3\], expected \[8, 64, 1, 1\]\)"),
        (RETINAFACE, lambda s: s | {"extra.weight": torch.zeros(2)}, r"tensors 1 unexpected \(extra.weight\)"),
        (BISENET, lambda s: {k: v for k, v in s.items() if k != "conv_out.conv.conv.weight"},
         r"does not fit facexlib BiSeNet: tensors 1 missing \(conv_out.conv.conv.weight\)"),
        (BISENET, lambda s: s | {"conv_out.conv_out.weight": torch.zeros(())},
         r"is not ConsisID's face parser: its conv_out.conv_out.weight is \[\], a parser of the 19 face classes"),
        (BISENET, lambda s: s | {"conv_out.conv_out.weight": torch.zeros(10**7, 0, 1, 1)},  # 40 M classes, no bytes
         r"its conv_out.conv_out.weight is \[10000000, 0, 1, 1\]"),
        (EVA, lambda s: s | {"visual.blocks.3.attn.q_proj.weight": torch.zeros(3, 3)},
         r"does not fit the EVA02-CLIP vision tower: tensors 1 of the wrong shape "
         r"\(blocks.3.attn.q_proj.weight: \[3, 3\], expected \[32, 32\]\)"),
        (EVA, lambda s: {k: v for k, v in s.items() if k != "visual.blocks.3.attn.q_proj.weight"},
         r"tensors 1 missing \(blocks.3.attn.q_proj.weight\)"),
        (EVA, lambda s: {k.replace("visual.blocks.3.", f"visual.blocks.{ARABIC_ONE}."): v for k, v in s.items()},
         rf"missing \(blocks\.3\..*unexpected \(blocks\.{ARABIC_ONE}\."),
        (EVA, lambda s: s | {"visual.cls_token": torch.zeros(())}, r"has shapes no EVA02-CLIP has \(tuple index"),
        (EVA, lambda s: s | {"visual.pos_embed": torch.zeros(5)}, r"has shapes no EVA02-CLIP has"),
        (EVA, lambda s: s | {"visual.pos_embed": torch.zeros(1, 0, 32)}, r"has shapes no EVA02-CLIP has"),
        (EVA, lambda s: s | {"visual.cls_token": torch.zeros(1, 1, 0)}, r"has sizes no EVA02-CLIP tower has"),
    ],
    ids=["retina-missing", "retina-shape", "retina-extra", "bisenet-missing", "bisenet-rank0", "bisenet-classes",
         "eva-shape", "eva-missing", "eva-arabic-digit", "eva-cls-rank0", "eva-pos-rank1", "eva-no-tokens",
         "eva-width0"],
)
def test_face_files_of_another_model_get_one_line(faces, fname, edit, message):
    path = faces / fname
    torch.save(edit(_state(path)), path)
    _face_refused(faces, message)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s | {"visual.blocks.100000.mlp.w1.weight": torch.zeros(1)},
         r"has a block number 100000; an EVA02-CLIP tower has at most 128 blocks"),
        (lambda s: s | {"visual.blocks.100.mlp.w1.weight": torch.zeros(1)}, r"tensors \d+ missing \(blocks\.100\."),
        (lambda s: s | {"visual.cls_token": torch.zeros(1, 1, 65536), "visual.rope.freqs_cos": torch.zeros(1, 64)},
         r"of the wrong shape \(blocks\.0\.attn\.k_proj\.weight: \[32, 32\], expected \[65536, 65536\]"),
    ],
    ids=["depth-100001", "depth-101", "width-65536"],
)
def test_eva_sizes_read_from_a_small_file_never_build_a_huge_model(faces, edit, message):
    """A few bytes can name a block 100000 or a width of 65536: building that tower would take
    minutes and tens of GB before any check. It is checked on the meta device first."""
    path = faces / EVA
    torch.save(edit(_state(path)), path)
    start = time.perf_counter()
    _face_refused(faces, message)
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("fname", [DETECTOR, RECOGNISER])
@pytest.mark.parametrize("damage", ["random", "half", "empty"])
def test_damaged_onnx_models(faces, fname, damage):
    path = faces / fname
    data = path.read_bytes()
    path.write_bytes({"random": random.Random(3).randbytes(4096), "half": data[: len(data) // 2], "empty": b""}[damage])
    _face_refused(faces, rf"'{_re(path)}' is not a readable ONNX model \(.+\); download the antelopev2 files again")


@pytest.mark.parametrize("fname,other,task,found", [(DETECTOR, RECOGNISER, "detection", "recognition"),
                                                    (RECOGNISER, DETECTOR, "recognition", "detection")])
def test_onnx_models_swapped(faces, fname, other, task, found):
    (faces / fname).write_bytes((faces / other).read_bytes())
    _face_refused(faces, rf"should be the antelopev2 {task} model, insightface reads it as {found}")


# ---------------------------------------------------------------------------------------------
# weights that diffusers would load into a broken model, said as what they are


@pytest.mark.parametrize("dtype,named", [(torch.int32, "I32"), (torch.int8, "I8"), (torch.bool, "BOOL")])
@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_integer_weights_are_refused_at_load(ckpt, component, dtype, named):
    """Integer or boolean weights, which diffusers and transformers would cast to the model's
    floats (a model of meaningless weights), are refused at load, naming the tensor and its dtype."""
    path = ckpt / component / WEIGHT_FILES[component]
    state = load_file(path)
    key = sorted(k for k, v in state.items() if v.ndim >= 2)[0]
    state[key] = state[key].round().to(dtype)
    _save(state, path)
    checkpoint = Checkpoint.open(ckpt)
    refused(CheckpointError, rf"'{_re(path)}': '{_re(key)}' holds {named} values, where a model's weights are floats: "
            r"the file is not the model's weights .*; use the checkpoint's original file",
            lambda: _load_component(checkpoint, component), ckpt)


@pytest.mark.parametrize("load", [load_transformer_file, load_vae_file], ids=["transformer", "vae"])
def test_integer_weights_in_a_single_file(ckpt, load):
    component = "transformer" if load is load_transformer_file else "vae"
    path = ckpt / component / WEIGHTS
    state = load_file(path)
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int32)
    _save(state, path)
    refused(CheckpointError, rf"'{_re(key)}' holds I32 values", lambda: load(path, "fp32"), ckpt)


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_a_weight_of_another_shape_than_the_config_names_it(ckpt, component):
    """diffusers' own message suggests `low_cpu_mem_usage=False` and `ignore_mismatched_sizes=True`,
    which would load random weights in its place and cannot be passed here anyway."""
    path = ckpt / component / WEIGHTS
    state = load_file(path)
    key = sorted(k for k, v in state.items() if v.ndim >= 2)[0]
    expected = list(state[key].shape)
    found = [expected[0] + 1, *expected[1:]]
    state[key] = torch.zeros(found)
    _save(state, path)
    checkpoint = Checkpoint.open(ckpt)
    message = refused(
        CheckpointError,
        rf"'{_re(ckpt / component)}' does not load as a \w+: its weight '{_re(key)}' is {_re(found)} in the files, the "
        rf"folder's config.json makes it {_re(expected)}: the weights and config.json come from different models; "
        "download the folder again",
        lambda: _load_component(checkpoint, component), ckpt,
    )
    assert "ignore_mismatched_sizes" not in message


@pytest.mark.parametrize("content", [b"garbage" * 100, b"", random.Random(3).randbytes(2048)],
                         ids=["text", "empty", "random"])
def test_a_damaged_tokenizer_is_not_a_missing_tiktoken(ckpt, content, capfd):
    """transformers falls back to other formats on a damaged spiece.model and ends with
    "pip install tiktoken", which would not help."""
    (ckpt / "tokenizer" / "spiece.model").write_bytes(content)
    checkpoint = Checkpoint.open(ckpt)
    message = refused(
        CheckpointError,
        rf"'{_re(ckpt / 'tokenizer')}' is not a valid T5 tokenizer: it needs T5's SentencePiece model, spiece.model, "
        r"and its spiece.model does not read as one \(.*\); download the checkpoint's tokenizer folder again",
        lambda: load_text_encoder(checkpoint, "fp32"), ckpt,
    )
    assert "tiktoken" not in message and "tiktoken" not in capfd.readouterr().err
