"""The transformer and the VAE from one .safetensors file each (diffusers key names), as people
keep them in ComfyUI's `models/diffusion_models` and `models/vae`.

A file's config comes from a checkpoint folder or a config.json, or is inferred from the weights'
shapes (what shapes cannot tell is the released checkpoint's); the model is built without memory,
every key and shape checked against the config, then the weights are loaded.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import (
    LOAD_ERRORS,
    Checkpoint,
    ConsisIDModel,
    check_float_weights,
    check_vae_fits,
    dtype_from_name,
    effective_config,
    enable_fp8_storage,
    read_json,
)
from .checks import check_shapes, check_tensors
from .decoder import speed_up_decoder
from .errors import CheckpointError, first_line
from .files import safetensors_header, shown

logger = logging.getLogger(__name__)

RELEASED_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}
"""The released checkpoint's scheduler/scheduler_config.json."""


def _indices(shapes: Mapping, pattern: str, where: str) -> list[int]:
    """The numbers `[0-9]+` in keys matching `pattern` (one group), at least one.

    A key under the same prefix numbered otherwise (digits of another script, a leading zero) is
    refused: left out of the count, it would make the inferred model smaller than the file."""
    prefix = pattern.split("(")[0].replace("\\", "")
    for key in shapes:
        number = key[len(prefix) :].split(".")[0] if key.startswith(prefix) else "0"
        if not re.fullmatch(r"0|[1-9][0-9]*", number):
            raise CheckpointError(
                f"{where} have the key '{shown(key)}', numbered '{shown(number)}' where diffusers writes 0, 1, 2, …: "
                "use a ConsisID file with diffusers key names"
            )
    found = sorted({int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))})
    if not found:
        raise CheckpointError(f"{where} are not a ConsisID transformer: no key matches {pattern.split('(')[0]}…")
    return found


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .safetensors file, read from its header alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"'{path}' is not a .safetensors file; the transformer loads only from .safetensors")
    try:
        return safetensors_header(path)[0]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable .safetensors file ({e})") from None


def _shapes_of_another_model(infer):
    """Shapes of another rank or size than the model's make `infer` fail in arithmetic: one line."""

    @functools.wraps(infer)
    def checked(shapes: Mapping[str, tuple[int, ...]], where: str = "the weights") -> dict:
        try:
            return infer(shapes, where)
        except (ValueError, ZeroDivisionError, IndexError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{where} have shapes no ConsisID model has ({e}); use a ConsisID file") from None

    return checked


@_shapes_of_another_model
def infer_transformer_config(shapes: Mapping[str, tuple[int, ...]], where: str = "the weights") -> dict:
    """A ConsisIDTransformer3DModel config from diffusers-named weights' shapes.

    What shapes cannot tell (how attention widths split into heads in the face layers, the
    native sample size, `is_kps`, `local_face_scale`) takes the values of the released
    ConsisID-preview; pass a checkpoint folder's config when yours differs.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"{where} are not a ConsisID transformer with diffusers key names: '{key}' is missing "
                f"(first keys found: {', '.join(shown(k) for k in sorted(shapes)[:5]) or 'none'})"
            )
        return shapes[key]

    inner, in_channels, patch, _ = shape("patch_embed.proj.weight")
    head_dim = shape("transformer_blocks.0.attn1.norm_q.weight")[0]
    num_layers = 1 + max(_indices(shapes, r"transformer_blocks\.([0-9]+)\..*", where))
    lfe = "local_facial_extractor."
    if lfe + "latents" not in shapes:
        raise CheckpointError(f"{where} have no local_facial_extractor: not a ConsisID transformer")
    _, num_queries, vit_dim = shape(lfe + "latents")
    num_id_token = shape(lfe + "id_embedding_mapping.6.weight")[0] // max(vit_dim, 1)
    depth = 1 + max(_indices(shapes, r"local_facial_extractor\.layers\.([0-9]+)\..*", where))
    num_scale = len(_indices(shapes, r"local_facial_extractor\.mapping_([0-9]+)\.0\.weight", where))
    num_cross = len(_indices(shapes, r"perceiver_cross_attention\.([0-9]+)\.to_q\.weight", where))
    lfe_inner = shape(lfe + "layers.0.0.to_q.weight")[0]
    cross_inner = shape("perceiver_cross_attention.0.to_q.weight")[0]
    lfe_dim_head = 64 if lfe_inner % 64 == 0 else lfe_inner
    cross_dim_head = 128 if cross_inner % 128 == 0 else cross_inner
    return {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // (patch * patch),
        "time_embed_dim": shape("time_embedding.linear_1.weight")[0],
        "text_embed_dim": shape("patch_embed.text_proj.weight")[1],
        "num_layers": num_layers,
        "patch_size": patch,
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in shapes,
        "norm_elementwise_affine": "norm_final.weight" in shapes,
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": "patch_embed.pos_embedding" in shapes,
        "is_train_face": True,
        "is_kps": False,
        "cross_attn_interval": num_layers // max(num_cross, 1),
        "cross_attn_dim_head": cross_dim_head,
        "cross_attn_num_heads": cross_inner // cross_dim_head,
        "LFE_id_dim": shape(lfe + "id_embedding_mapping.0.weight")[1],
        "LFE_vit_dim": vit_dim,
        "LFE_depth": depth,
        "LFE_dim_head": lfe_dim_head,
        "LFE_num_heads": lfe_inner // lfe_dim_head,
        "LFE_num_id_token": num_id_token,
        "LFE_num_querie": num_queries,
        "LFE_output_dim": shape(lfe + "proj_out")[1],
        "LFE_ff_mult": shape(lfe + "layers.0.1.1.weight")[0] // vit_dim,
        "LFE_num_scale": num_scale,
    }


RELEASED_TRANSFORMER_CONFIG = {
    "num_attention_heads": 48,
    "attention_head_dim": 64,
    "in_channels": 32,
    "out_channels": 16,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "num_layers": 42,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
    "is_train_face": True,
    "is_kps": False,
    "cross_attn_interval": 2,
    "cross_attn_dim_head": 128,
    "cross_attn_num_heads": 16,
    "LFE_id_dim": 1280,
    "LFE_vit_dim": 1024,
    "LFE_depth": 10,
    "LFE_dim_head": 64,
    "LFE_num_heads": 16,
    "LFE_num_id_token": 5,
    "LFE_num_querie": 32,
    "LFE_output_dim": 2048,
    "LFE_ff_mult": 4,
    "LFE_num_scale": 5,
    "local_face_scale": 1.0,
}
"""The released checkpoint's transformer (ConsisID-preview: CogVideoX-5B-I2V's and the face
layers): its sizes and switches; ConsisIDTransformer3DModel's defaults for the rest. What weights'
shapes cannot tell (`infer_transformer_config`) is taken from here."""


RELEASED_VAE_CONFIG = {"scaling_factor": 0.7}
"""The released checkpoint's VAE (CogVideoX-5B-I2V's): AutoencoderKLCogVideoX's defaults but this."""


@_shapes_of_another_model
def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], where: str = "the weights") -> dict:
    """An AutoencoderKLCogVideoX config from diffusers-named weights' shapes.

    Widths, depth and latent channels come from the shapes; the rest (32 norm groups, 4× temporal
    compression, scaling factor 0.7) are the released checkpoint's.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"{where} are not a CogVideoX VAE with diffusers key names: '{key}' is missing "
                f"(first keys found: {', '.join(shown(k) for k in sorted(shapes)[:5]) or 'none'})"
            )
        return shapes[key]

    blocks = 0
    while f"encoder.down_blocks.{blocks}.resnets.0.conv2.conv.weight" in shapes:
        blocks += 1
    shape("encoder.down_blocks.0.resnets.0.conv2.conv.weight")
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.conv.weight" in shapes:
        layers += 1
    return {
        **RELEASED_VAE_CONFIG,
        "in_channels": shape("encoder.conv_in.conv.weight")[1],
        "out_channels": shape("decoder.conv_out.conv.weight")[0],
        "down_block_types": ["CogVideoXDownBlock3D"] * blocks,
        "up_block_types": ["CogVideoXUpBlock3D"] * blocks,
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight")[0] for i in range(blocks)],
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.conv.weight")[1],
    }


def _config_from(config: Mapping | str | os.PathLike, component: str) -> dict:
    """A config dict, a checkpoint folder (its component's config.json), or a config.json path."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = Checkpoint.open(path).root / component / "config.json"
    return read_json(path)


def _build_config(config: Mapping, component: str, where) -> dict:
    """A file's own config as given (checked): what `from_config` receives."""
    effective_config(config, component, where)
    return dict(config)


def _load_single_file(cls, path: Path, shapes: Mapping, config: Mapping, dtype: torch.dtype, what: str):
    """Build `cls` from `config` without memory, check every key and shape, then load the weights."""
    check_float_weights(path)
    try:
        with torch.device("meta"):
            model = cls.from_config(dict(config))
    except LOAD_ERRORS as e:
        first = first_line(e, 300)
        raise CheckpointError(
            f"the {what} config for '{path}' does not build: {first}; pass the checkpoint's config"
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, shapes, f"the weights in '{path}'", f"pass the {what} config of the checkpoint this file came from")
    try:
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k).to(dtype) for k in expected}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable .safetensors file ({e})") from None
    check_tensors(state.items(), f"'{path}'", "the file is damaged; download or convert it again", CheckpointError)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def load_transformer_file(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    config: Mapping | str | os.PathLike | None = None,
    fp8: bool = False,
) -> torch.nn.Module:
    """A ConsisIDTransformer3DModel from one .safetensors file with diffusers key names.

    `config` is a config dict, a checkpoint folder (its transformer/config.json is used), a
    config.json, or None to infer it from the weights' shapes. `fp8` as for `Checkpoint.load_model`.
    """
    from diffusers import ConsisIDTransformer3DModel

    path = Path(path)
    shapes = read_safetensors_shapes(path)
    if config is None:
        config = infer_transformer_config(shapes, f"the weights in '{path}'")
        logger.info("inferred the transformer config of '%s' from its weights' shapes", path.name)
    else:
        config = _config_from(config, "transformer")
    config = _build_config(config, "transformer", f"the config for {path.name}")
    transformer = _load_single_file(
        ConsisIDTransformer3DModel, path, shapes, config, dtype_from_name(dtype), "ConsisID transformer"
    )
    if fp8:
        enable_fp8_storage(transformer)
    return transformer


def load_vae_file(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    config: Mapping | str | os.PathLike | None = None,
) -> torch.nn.Module:
    """An AutoencoderKLCogVideoX from one .safetensors file with diffusers key names.

    `config` as for `load_transformer_file`; None infers it from the weights' shapes.
    """
    from diffusers import AutoencoderKLCogVideoX

    path = Path(path)
    shapes = read_safetensors_shapes(path)
    config = infer_vae_config(shapes, f"the weights in '{path}'") if config is None else _config_from(config, "vae")
    config = _build_config(config, "vae", f"the config for {path.name}")
    vae = _load_single_file(AutoencoderKLCogVideoX, path, shapes, config, dtype_from_name(dtype), "CogVideoX VAE")
    return speed_up_decoder(vae)


def model_from_files(
    transformer_path: str | os.PathLike,
    vae_path: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    fp8: bool = False,
) -> ConsisIDModel:
    """A model from a single-file transformer and a single-file VAE, configs inferred, no folder.

    There is no T5 or face models then: text comes from another encoder, identities from files.
    """
    model = ConsisIDModel(
        load_transformer_file(transformer_path, dtype, fp8=fp8),
        load_vae_file(vae_path, dtype),
        RELEASED_SCHEDULER_CONFIG,
        None,
    )
    check_vae_fits(model)
    return model
