"""ConsisID's checkpoints converted for the native ComfyUI path: the transformer's keys in
ComfyUI's CogVideoX layout, the face layers in a file of their own with their settings, LoRAs in
ComfyUI's layout, each read and checked as a checkpoint is; `export` writes them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import DTYPES, FACE_LAYERS, MAX_JSON_BYTES, Checkpoint, check_float_weights
from .checks import CONFIG_RULES, check_config, check_face_rules, check_number, check_shapes, check_tensors, class_defaults
from .errors import CheckpointError, ConsisIDError, first_line
from .face_layers import REEXPORT, FaceLayers, face_config
from .files import file_stem, output_folder, safetensors_header, shown, write_all, write_atomically
from .lora import LoRA, read_lora
from .media import check_output
from .memory import check_fits
from .quant import check_format, quantize
from .reference import flow_sigmas
from .single_file import RELEASED_SCHEDULER_CONFIG, infer_transformer_config, read_safetensors_shapes

logger = logging.getLogger(__name__)

FACE_FORMAT = "consisid-face-modules"

_BLOCK_KEYS = {
    "norm1.linear": "norm1.linear", "norm1.norm": "norm1.norm", "norm2.linear": "norm2.linear",
    "norm2.norm": "norm2.norm", "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v",
    "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k", "attn1.to_out.0": "attn_out",
    "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out",
}
_TOP_KEYS = {"time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2"}
_BLOCK = re.compile(r"transformer_blocks\.([0-9]+)\.(.+)\.(weight|bias)")


def comfy_key(key: str) -> str:
    """A diffusers ConsisID transformer key (not a face module's) in ComfyUI's CogVideoX layout
    (`comfy.ldm.cogvideo.model`): transformer_blocks.N.attn1.to_q.weight -> blocks.N.q.weight, …"""
    found = _BLOCK.fullmatch(key)
    if found:
        index, module, kind = found.groups()
        if module not in _BLOCK_KEYS:
            raise CheckpointError(f"transformer key '{key}' has no place in ComfyUI's CogVideoX layout")
        return f"blocks.{index}.{_BLOCK_KEYS[module]}.{kind}"
    module, _, kind = key.rpartition(".")
    return f"{_TOP_KEYS.get(module, module)}.{kind}"


def diffusers_key(key: str) -> str:
    """The inverse of `comfy_key`."""
    found = re.fullmatch(r"blocks\.([0-9]+)\.(.+)\.(weight|bias)", key)
    if found:
        index, module, kind = found.groups()
        inverse = {v: k for k, v in _BLOCK_KEYS.items()}
        return f"transformer_blocks.{index}.{inverse[module]}.{kind}"
    module, _, kind = key.rpartition(".")
    inverse = {v: k for k, v in _TOP_KEYS.items()}
    return f"{inverse.get(module, module)}.{kind}"


def is_face_key(key: str) -> bool:
    return key.split(".", 1)[0] in FACE_LAYERS


def source_weights(source: str | os.PathLike, cancel: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
    """A ConsisID transformer's weights (diffusers key names) and config, from a ConsisID folder
    or a single .safetensors file (config inferred from the weights' shapes), read as a checkpoint
    is: the config within `checks.CONFIG_RULES` and every key and shape against it before a tensor
    is read (so a layer index beyond the config is refused unbuilt), then floats only, finite,
    with `cancel` called between tensors."""
    path = Path(source)
    if path.is_dir():
        config = dict(Checkpoint.open(path).transformer_config)
        files = sorted((path / "transformer").glob("*.safetensors"))
        shapes = {k: v for file in files for k, v in read_safetensors_shapes(file).items()}
    else:
        if not path.is_file():
            raise CheckpointError(f"'{path}' is neither a ConsisID checkpoint folder nor a .safetensors file")
        shapes = read_safetensors_shapes(path)
        inferred = infer_transformer_config(shapes, f"the weights in '{path}'")
        config = checked_transformer_config(inferred, f"{path} (the config its keys and shapes make)")
        files = [path]
    check_shapes(transformer_shapes(config), shapes, f"the transformer weights in '{path}'", REEXPORT)
    check_fits(sum(file.stat().st_size for file in files), "cpu", f"reading the transformer in '{path}'",
               "free memory, or use a smaller file (bf16 rather than fp32)")
    weights = {}
    for file in files:
        weights |= read_weights(file, cancel)
    return weights, config


def checked_transformer_config(config: Mapping, where: str) -> dict:
    """A transformer config (or the face layers' part of one) within `checks.CONFIG_RULES` and
    what the face layers need of its numbers (`checks.check_face_rules`), with diffusers' defaults."""
    from diffusers import ConsisIDTransformer3DModel

    effective = check_config(config, "ConsisIDTransformer3DModel", where, class_defaults(ConsisIDTransformer3DModel))
    check_face_rules(effective, where)
    return effective


def transformer_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the diffusers ConsisID transformer `config` builds (built on the meta device)."""
    from diffusers import ConsisIDTransformer3DModel

    with torch.device("meta"):
        model = ConsisIDTransformer3DModel.from_config(dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_weights(path: Path, cancel: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file whose header was checked: floats only, each finite and
    within `checks.MAX_MAGNITUDE`, `cancel` called before each."""
    check_float_weights(path)
    weights = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                cancel()
                tensor = f.get_tensor(key)
                check_tensors([(key, tensor)], f"'{path}'", f"the file is damaged; {REEXPORT}", CheckpointError)
                weights[key] = tensor
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable .safetensors file ({first_line(e)})") from None
    return weights


def split_weights(weights: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(transformer weights in ComfyUI's CogVideoX layout, face-layer weights)."""
    core = {comfy_key(k): v for k, v in weights.items() if not is_face_key(k)}
    face = {k: v for k, v in weights.items() if is_face_key(k)}
    if not face:
        raise CheckpointError("these transformer weights have no face layers: not a ConsisID transformer")
    return core, face


def face_file_metadata(config: Mapping, latent_channels: int, scaling_factor: float,
                       scheduler_config: Mapping | None = None) -> dict:
    return {
        "format": FACE_FORMAT,
        "config": json.dumps(face_config(config)),
        "latent_channels": str(latent_channels),
        "scaling_factor": repr(float(scaling_factor)),
        "scheduler": json.dumps({k: v for k, v in dict(scheduler_config or RELEASED_SCHEDULER_CONFIG).items()}),
    }


def read_face_file(path: str | os.PathLike, cancel: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
    """The face layers' weights and their settings (config, latent channels, scaling factor,
    scheduler) from a file `export` wrote, read as a checkpoint is: the header and every setting
    checked (`face_file_settings`), the weights' keys and shapes against the config before a tensor
    is read, then the weights themselves (`read_weights`, `cancel` called between them)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist")
    try:
        shapes, metadata = safetensors_header(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable .safetensors file ({first_line(e)})") from None
    info = face_file_settings(metadata, str(path))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FaceLayers(info["config"], cancel).state_dict().items()}
    check_shapes(expected, shapes, f"the face-layer weights in '{path}'", REEXPORT)
    check_fits(path.stat().st_size, "cpu", f"reading the face layers in '{path}'", "free memory")
    return read_weights(path, cancel), info


def face_file_settings(metadata: Mapping[str, str], where: str) -> dict:
    """A face-layers file's settings from its metadata, each checked: the face config within
    `checks.CONFIG_RULES`, the latent channels and scaling factor within a VAE config's bounds, the
    scheduler config within the scheduler's (`checked_scheduler`)."""
    if metadata.get("format") != FACE_FORMAT:
        raise CheckpointError(f"'{where}' is not a ConsisID face-layers file (write one with `python -m consisid_core export`)")
    config = face_config(checked_transformer_config(_json_setting(metadata, "config", where), f"{where} (config)"))
    vae = CONFIG_RULES["AutoencoderKLCogVideoX"]
    return {
        "config": config,
        "latent_channels": _number_setting(metadata, "latent_channels", where, vae["latent_channels"]),
        "scaling_factor": _number_setting(metadata, "scaling_factor", where, vae["scaling_factor"]),
        "scheduler": checked_scheduler(_json_setting(metadata, "scheduler", where), f"{where} (scheduler)"),
    }


def _json_setting(metadata: Mapping[str, str], key: str, where: str) -> dict:
    text = metadata.get(key)
    fix = "export the face layers again with `python -m consisid_core export`"
    if not isinstance(text, str) or len(text) > MAX_JSON_BYTES:
        raise CheckpointError(f"'{where}' has no '{key}' setting of at most {MAX_JSON_BYTES // 1024} kB: {fix}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"'{where}': its '{key}' setting is not JSON ({first_line(e)}): {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"'{where}': its '{key}' setting must be a JSON object, found {type(value).__name__}: {fix}")
    return value


def _number_setting(metadata: Mapping[str, str], key: str, where: str, rule: tuple) -> int | float:
    kind, low, high = rule
    text = metadata.get(key)
    try:
        value = int(text) if kind == "int" else float(text)
    except (TypeError, ValueError, OverflowError):
        value = text
    try:
        return check_number(f"its '{key}' setting", value, low, high, integer=kind == "int")
    except ConsisIDError as e:
        raise CheckpointError(f"'{where}': {e}; export the face layers again with `python -m consisid_core export`") from None


def checked_scheduler(config: Mapping, where: str) -> dict:
    """A scheduler config within `checks.CONFIG_RULES`, v-prediction (what the native MODEL
    samples), whose schedule in flow coordinates (`flow_sigmas`) is finite and rising."""
    from diffusers import CogVideoXDPMScheduler

    fix = "use the checkpoint's original scheduler_config.json"
    effective = check_config(config, "CogVideoXDPMScheduler", where, class_defaults(CogVideoXDPMScheduler))
    if effective["prediction_type"] != "v_prediction":
        raise CheckpointError(f"'{where}': prediction_type is '{effective['prediction_type']}'; ConsisID predicts "
                              f"v (v_prediction): {fix}")
    try:
        sigmas = flow_sigmas(config)
    except (ValueError, TypeError, ArithmeticError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"'{where}' makes no noise schedule ({first_line(e)}): {fix}") from None
    if not torch.isfinite(sigmas).all() or (sigmas.diff() < 0).any() or not sigmas[0] < sigmas[-1]:
        raise CheckpointError(f"'{where}' makes a noise schedule that is not finite and rising (betas "
                              f"{effective['beta_start']} to {effective['beta_end']}): {fix}")
    return dict(config)


def vae_settings(source: str | os.PathLike) -> tuple[int, float]:
    """(latent channels, scaling factor) of the folder's VAE; the released ones for a single file."""
    path = Path(source)
    if path.is_dir():
        vae = Checkpoint.open(path).vae_config
        return vae["latent_channels"], vae["scaling_factor"]
    return 16, 0.7


@dataclass(frozen=True)
class ModelParts:
    """What a native MODEL is made of, read from one ConsisID source (`model_parts`): what `export`
    writes and the native loader loads."""

    core: dict[str, torch.Tensor]
    """The transformer's weights in ComfyUI's CogVideoX layout (in a `quant.FORMATS` format, when asked)."""
    face: dict[str, torch.Tensor]
    """The face layers' weights (diffusers key names)."""
    config: dict
    """The transformer's config, checked (the face layers take theirs from it: `face_config`)."""
    latent_channels: int
    scaling_factor: float
    scheduler: dict | None
    """The scheduler config, checked (`checked_scheduler`); None for a single file: the released one."""


def model_parts(source: str | os.PathLike, cancel: Callable[[], None] = lambda: None, dtype: torch.dtype | None = None,
                quant: str | None = None) -> ModelParts:
    """A native MODEL's parts from a ConsisID checkpoint folder or single transformer file, read as a
    checkpoint is (`source_weights`, `cancel` called between tensors); a checkpoint with is_kps on is
    refused and the scheduler config checked. With `dtype` every weight in it; with `quant` (a
    `quant.FORMATS` name) the transformer's block linear layers in that format, each full-precision
    weight let go as it is quantized."""
    weights, config = source_weights(source, cancel)
    if config.get("is_kps"):
        raise ConsisIDError("this checkpoint has is_kps on (keypoint latents): the native path takes is_kps off only")
    channels, scaling = vae_settings(source)
    scheduler = None
    if Path(source).is_dir():
        scheduler = checked_scheduler(Checkpoint.open(source).scheduler_config, f"{source}/scheduler")
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    core, face = split_weights(weights)
    del weights
    cancel()
    if quant is not None:
        core = quantize(core, quant, release=True)
    return ModelParts(core, face, config, channels, scaling, scheduler)


EXPORT_DTYPES = {"keep": None, **DTYPES}
"""`export --dtype`: the weights' precision in the exported files (keep: as most of them are stored)."""


def export(source: str | os.PathLike | None, out_dir: str | os.PathLike, name: str = "consisid",
           overwrite: bool = False, dtype: torch.dtype | None = None, loras=(), quant: str | None = None) -> list[Path]:
    """Write `<name>_transformer.safetensors` (ComfyUI's CogVideoX layout: core UNETLoader detects
    it as CogVideoX) and `<name>_face.safetensors` (the face layers with their config) of `source`
    (None: neither), and `<stem>_comfy.safetensors` of each LoRA in `loras` (as `export_lora` writes
    it), to `out_dir`: all of them or none. With `quant` (a `quant.FORMATS` name) the transformer's
    block linear layers are stored in that core format; the face layers stay as they are.

    Every refusal comes before the first byte is written: the folder (resolved once, no link), the
    names (plain file names), every target (see `media.check_output`), the weights (read as a
    checkpoint is: `source_weights`) and the LoRAs (read as `generate` reads them)."""
    if quant is not None:
        check_format(quant)
    out = output_folder(out_dir)
    targets = _export_targets(out, file_stem(name, "--name") if source is not None else None, loras)
    for target in targets:
        check_output(target, overwrite, suffixes=(".safetensors",))
    writes = {}
    if source is not None:
        writes |= _model_writes(source, dtype, quant, *targets[:2])
    for lora, target in zip(loras, targets[len(targets) - len(loras):]):
        writes[target] = _lora_write(lora)
    return write_all(writes, overwrite)


def _export_targets(out: Path, name: str | None, loras) -> list[Path]:
    """The files `export` writes: the model's two (without a name, none), then one per LoRA."""
    targets = [] if name is None else [out / f"{name}_transformer.safetensors", out / f"{name}_face.safetensors"]
    sources: dict[Path, Path] = {}
    for lora in map(Path, loras):
        target = out / f"{lora.stem}_comfy.safetensors"
        if target in sources:
            twice = os.path.abspath(sources[target]) == os.path.abspath(lora)
            raise ConsisIDError(
                f"--lora '{shown(lora)}' is given twice" if twice else
                f"--lora '{shown(sources[target])}' and '{shown(lora)}' would both be written as '{target.name}': "
                "give each LoRA file a name of its own"
            )
        sources[target] = lora
        targets.append(target)
    return targets


def _model_writes(source, dtype: torch.dtype | None, quant: str | None, transformer_path: Path, face_path: Path) -> dict:
    """The transformer's and the face layers' files, each a write of `save_file` (weights checked;
    the transformer's in `quant`'s format, when given)."""
    parts = model_parts(source, dtype=dtype, quant=quant)
    metadata = face_file_metadata(parts.config, parts.latent_channels, parts.scaling_factor, parts.scheduler)
    contiguous = lambda d: {k: v.contiguous() for k, v in d.items()}  # noqa: E731
    return {
        transformer_path: functools.partial(save_file, contiguous(parts.core)),
        face_path: functools.partial(save_file, contiguous(parts.face), metadata=metadata),
    }


def comfy_named(lora: LoRA) -> LoRA:
    """`lora`'s transformer layers under the module names of ComfyUI's CogVideoX
    (`comfy.ldm.cogvideo`: transformer_blocks.N.attn1.to_q -> blocks.N.q, …), which the native
    MODEL has. Core's LoRA loaders map no diffusers names for CogVideoX, so this is how a LoRA in
    diffusers/PEFT layout reaches the native MODEL.

    Layers of the face layers are left out, with a warning: on the native MODEL the face layers
    are held apart from the MODEL's weights (a patcher of their own), which LoRA patches do not reach."""
    layers, left_out = {}, []
    for name, layer in lora.layers.items():
        if is_face_key(name):
            left_out.append(name)
        else:
            layers[comfy_key(name + ".weight").removesuffix(".weight")] = layer
    if not layers:
        raise ConsisIDError(f"LoRA '{lora.name}' changes only the face layers; the native path cannot take it "
                            "(use ConsisID LoRA on the wrapper path)")
    if left_out:
        logger.warning("%d face-layer layers of LoRA '%s' are left out (first: %s): on the native path LoRAs do not "
                       "reach the face layers", len(left_out), lora.name, left_out[0])
    return LoRA(lora.name, layers)


def comfy_lora_tensors(lora: LoRA) -> dict[str, torch.Tensor]:
    """A `comfy_named` LoRA as core's LoRA loaders read it: `diffusion_model.<module>.lora_A.weight`,
    `….lora_B.weight` and `….alpha` (alpha / rank is the layer's scale)."""
    tensors = {}
    for module, layer in lora.layers.items():
        key = "diffusion_model." + module
        tensors[f"{key}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
    return tensors


def export_lora(source: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> Path:
    """A ConsisID LoRA (diffusers/PEFT layout, as `lora.read_lora` reads) written in ComfyUI's
    CogVideoX layout (`comfy_lora_tensors`), for core's LoRA loaders on the native MODEL."""
    target = check_output(target, overwrite, suffixes=(".safetensors",))
    return write_atomically(target, _lora_write(source), overwrite)


def _lora_write(source: str | os.PathLike):
    """The LoRA read and checked now; what writes it in ComfyUI's layout to a path given later."""
    return functools.partial(save_file, comfy_lora_tensors(comfy_named(read_lora(source))))
