"""LoRA files on the ConsisID transformer: read and checked, then merged into its weights for one
run and taken out after it (the original tensors put back, bit for bit).

A LoRA file is a .safetensors in the diffusers/PEFT layout that ConsisID's trainer and the
CogVideoX-5B(-I2V) trainers write: `transformer.<layer>.lora_A.weight` [rank, in] and
`transformer.<layer>.lora_B.weight` [out, rank] for the transformer's linear layers (the face
layers' too), or the same keys under ComfyUI's `diffusion_model.` prefix. Each layer's scale is
the one diffusers' `load_lora_weights` gives it: from the `lora_adapter_metadata` in the file's
header when there is one (PEFT's `lora_alpha / r`, its rank and alpha patterns, rsLoRA's
`lora_alpha / sqrt(r)`), else 1; a `<layer>.alpha` tensor (kohya-style files, which diffusers does
not read) gives `alpha / rank`, as ComfyUI reads it. At strength s a layer's weight becomes
W + s · scale · B @ A for the run: what diffusers' `fuse_lora(lora_scale=s)` makes of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import ConsisIDModel
from .checks import check_number, check_tensors
from .errors import ConsisIDError, first_line
from .files import safetensors_header, shown

PREFIXES = ("transformer.", "diffusion_model.")
"""diffusers' key prefix for the transformer's layers, and ComfyUI's."""
DOWN, UP, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
METADATA_KEY = "lora_adapter_metadata"
"""Where diffusers' `save_lora_weights` keeps the adapter's LoraConfig in the file's header."""

MAX_FILE_BYTES = 8 * 2**30
"""A rank-256 LoRA of every linear layer of the released transformer is about 1.3 GB in bf16."""
MAX_TENSORS = 20_000
"""The released transformer has about 600 linear layers; a LoRA holds two or three tensors each."""
MAX_METADATA_CHARACTERS = 2**20
MAX_STRENGTH = 100.0
MAX_SCALE = 1000.0
"""A layer's scale (alpha / rank, alpha / √rank for rsLoRA): trained LoRAs have 0.1 to 16 or so; a
larger one makes the run's numbers overflow, which would be found only after sampling."""
PEFT_DEFAULT_RANK = 8
"""`peft.LoraConfig`'s `r` and `lora_alpha` when its metadata leaves them out."""
_FIX = "use a LoRA trained for ConsisID or CogVideoX-5B-I2V, in diffusers layout"


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """One linear layer's update: scale · up @ down (`lora_B` @ `lora_A`)."""

    key: str
    """The file's key of `down`, named in messages."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA file, read and checked: its layers by the transformer's module names."""

    name: str
    layers: Mapping[str, LoRALayer]


Stack = tuple[tuple[LoRA, float], ...]
"""LoRAs with their strengths, applied in this order (a `ConsisIDModel`'s `loras`)."""


def _refuse(name: str, problem: str, fix: str = _FIX) -> ConsisIDError:
    return ConsisIDError(f"LoRA '{shown(name)}': {problem}; {fix}")


def read_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA .safetensors (any other content is refused, whatever its name), its keys, shapes
    and scales checked before any tensor is read."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        what = "is a folder; give the LoRA's .safetensors file" if path.is_dir() else "does not exist"
        raise ConsisIDError(f"LoRA file '{shown(path)}' {what}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _refuse(name, f"the file is {size / 2**30:.1f} GB, over the {MAX_FILE_BYTES // 2**30} GB a LoRA of the "
                            "released transformer can need: it is not a LoRA")
    try:
        shapes, header = safetensors_header(path)
        if not shapes:
            raise _refuse(name, "the file holds no tensors")
        if len(shapes) > MAX_TENSORS:
            raise _refuse(name, f"it holds {len(shapes)} tensors, over the {MAX_TENSORS} a LoRA of ConsisID can have")
        plan = _plan(name, shapes, _metadata(name, header))
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise _refuse(name, _not_safetensors(path, e), "use its .safetensors file") from None
    odd = next((k for k, t in tensors.items() if not t.is_floating_point()), None)
    if odd is not None:
        raise _refuse(name, f"'{shown(odd)}' holds {str(tensors[odd].dtype).removeprefix('torch.')} values, not floats")
    check_tensors(tensors.items(), f"LoRA '{shown(name)}'", "the file is damaged; download it again")
    layers = {}
    for module, (down, up, alpha, scale) in plan.items():
        if alpha is not None:
            value = check_number(f"LoRA '{shown(name)}': '{shown(alpha)}'", tensors[alpha].flatten()[0].item())
            scale = _bounded(name, f"'{shown(alpha)}'", module, value / shapes[down][0])
        layers[module] = LoRALayer(down, tensors[down], tensors[up], scale)
    return LoRA(name, layers)


def _not_safetensors(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "the file holds pickled PyTorch weights, which are never loaded (they could run code), not safetensors"
    return f"the file is not a readable .safetensors file ({first_line(error)})"


def _metadata(name: str, header: Mapping[str, str]) -> dict | None:
    """diffusers' adapter metadata (the LoraConfig it saved), without the `transformer.` prefix."""
    text = header.get(METADATA_KEY)
    if text is None:
        return None
    if len(text) > MAX_METADATA_CHARACTERS:
        raise _refuse(name, f"its {METADATA_KEY} is over {MAX_METADATA_CHARACTERS} characters: not a LoraConfig")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _refuse(name, f"its {METADATA_KEY} is not JSON ({first_line(e)})", "save the LoRA again") from None
    if not isinstance(data, dict):
        raise _refuse(name, f"its {METADATA_KEY} is not a JSON object", "save the LoRA again")
    config = {k.removeprefix("transformer."): v for k, v in data.items() if k.startswith("transformer.")}
    if not config:
        return None
    for flag, what in (("use_dora", "a DoRA"), ("lora_bias", "a LoRA with biases (lora_bias)")):
        if config.get(flag):
            raise _refuse(name, f"it is {what}, which is not supported", "use a plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise _refuse(name, f"its metadata's {key} is not a mapping", "save the LoRA again")
        for pattern, value in patterns.items():
            if not all(c.isalnum() or c in "._" for c in pattern.removeprefix("^")):
                raise _refuse(name, f"its metadata's {key} has the regular expression '{shown(pattern)}'; only layer "
                                    "names are read", "save the LoRA with layer names")
            check_number(f"LoRA '{shown(name)}': {key} '{shown(pattern)}'", value)
    for key in ("r", "lora_alpha"):
        check_number(f"LoRA '{shown(name)}': metadata {key}", config.setdefault(key, PEFT_DEFAULT_RANK))
    return config


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's `get_pattern_key`: the first pattern naming `module` or a dotted suffix of it
    (`^name`: the whole name)."""
    for pattern, value in patterns.items():
        if pattern.startswith("^"):
            if module == pattern[1:]:
                return value
        elif module == pattern or module.endswith("." + pattern):
            return value
    return default


def _plan(name: str, shapes: Mapping[str, tuple[int, ...]], config: Mapping | None) -> dict:
    """module -> (down key, up key, alpha key or None, scale): every key and shape checked."""
    parts: dict[str, dict[str, str]] = {}
    for key in shapes:
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in (DOWN, UP, ALPHA) if key.endswith(s)), None)
        if prefix is None or suffix is None:
            if "lora_magnitude_vector" in key or "dora_scale" in key:
                raise _refuse(name, f"'{shown(key)}' belongs to a DoRA, which is not supported", "use a plain LoRA")
            what = (f"does not begin with {' or '.join(PREFIXES)}" if prefix is None
                    else f"is not a layer's {DOWN[1:]}, {UP[1:]} or {ALPHA[1:]}")
            raise _refuse(name, f"the key '{shown(key)}' {what}: this is not a LoRA of the ConsisID transformer in "
                                "diffusers layout")
        parts.setdefault(key[len(prefix): -len(suffix)], {})[suffix] = key
    plan = {}
    for module, found in parts.items():
        down, up = found.get(DOWN), found.get(UP)
        if down is None or up is None:
            have = down or up or found[ALPHA]
            missing = (DOWN if down is None else UP)[1:]
            raise _refuse(name, f"'{shown(have)}' has no {missing} beside it", "download it again")
        if len(shapes[down]) != 2 or len(shapes[up]) != 2 or shapes[down][0] != shapes[up][1] or not shapes[down][0]:
            raise _refuse(name, f"'{shown(down)}' {list(shapes[down])} and '{shown(up)}' {list(shapes[up])} are not "
                                "the [rank, in] and [out, rank] matrices of a LoRA of a linear layer")
        rank, scale = shapes[down][0], 1.0
        if config is not None:
            r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            if r != rank:
                raise _refuse(name, f"its metadata gives '{shown(module)}' rank {r}, its tensors have rank {rank}",
                              "save the LoRA again")
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            scale = _bounded(name, "its metadata's lora_alpha", module, scale)
        if ALPHA in found and math.prod(shapes[found[ALPHA]]) != 1:
            raise _refuse(name, f"'{shown(found[ALPHA])}' is not one number", "download it again")
        plan[module] = (down, up, found.get(ALPHA), scale)
    return plan


def _bounded(name: str, source: str, module: str, scale: float) -> float:
    """A layer's scale, refused beyond `MAX_SCALE` before any weight changes."""
    if not abs(scale) <= MAX_SCALE:
        raise _refuse(name, f"{source} gives '{shown(module)}' a scale of {scale:.3g} (alpha / rank), over the "
                            f"{MAX_SCALE:g} no trained LoRA comes near", "save it again with its trained alpha")
    return scale


def check_lora_fits(lora: LoRA, transformer: torch.nn.Module) -> None:
    """Refuse a LoRA with a layer this transformer does not have (as a linear layer of that shape)."""
    fitting = 0
    problem = None
    for module, layer in lora.layers.items():
        try:
            target = transformer.get_submodule(module) if module else None
        except AttributeError:
            target = None
        if not isinstance(target, torch.nn.Linear):
            problem = problem or f"'{shown(layer.key)}' names no linear layer of this ConsisID transformer"
            continue
        fitting += 1
        out_features, in_features = target.weight.shape
        if layer.down.shape[1] != in_features or layer.up.shape[0] != out_features:
            problem = problem or (
                f"'{shown(layer.key)}' is for a layer of {layer.down.shape[1]} inputs and {layer.up.shape[0]} outputs, "
                f"this transformer's '{shown(module)}' has {in_features} and {out_features}: it is for another model"
            )
    if fitting == 0:
        first = next(iter(lora.layers.values()), None)
        raise _refuse(lora.name, f"none of its {len(lora.layers)} layers is in this ConsisID transformer (first: "
                                 f"'{shown(first.key) if first else 'no tensors'}'): it is for another model")
    if problem:
        raise _refuse(lora.name, problem)


def check_strength(strength) -> float:
    return check_number("LoRA strength", strength, -MAX_STRENGTH, MAX_STRENGTH, "1 applies it as trained")


def with_loras(model: ConsisIDModel, loras: Iterable[tuple[LoRA, float]]) -> ConsisIDModel:
    """`model` with `loras` (each with its strength) stacked on the LoRAs it has: a new model
    sharing the same modules, whose weights change only while a run merges them (`merged`)."""
    added = tuple((lora, check_strength(strength)) for lora, strength in loras)
    for lora, _ in added:
        check_lora_fits(lora, model.transformer)
    return dataclasses.replace(model, loras=(*model.loras, *added))


def lora_argument(text: str) -> tuple[Path, float]:
    """The command line's `FILE[:STRENGTH]` -> (file, strength); strength 1 when not given."""
    path, colon, strength = text.rpartition(":")
    if colon and path:
        try:
            return Path(path), float(strength)
        except ValueError:
            pass
    return Path(text), 1.0


def read_loras(arguments: Sequence[tuple[Path, float]], transformer_config: Mapping) -> Stack:
    """The command line's LoRAs, read and checked against a transformer of `transformer_config`
    built without memory, so that a wrong file stops the run before any weights load."""
    if not arguments:
        return ()
    from diffusers import ConsisIDTransformer3DModel

    with torch.device("meta"):
        skeleton = ConsisIDTransformer3DModel.from_config(dict(transformer_config))
    loras = tuple((read_lora(path), check_strength(strength)) for path, strength in arguments)
    for lora, _ in loras:
        check_lora_fits(lora, skeleton)
    return loras


@contextlib.contextmanager
def merged(transformer: torch.nn.Module, loras: Stack, device: torch.device | str | None = None) -> Iterator[None]:
    """For the block, each linear layer a LoRA names holds W + Σ strength · scale · B @ A (computed
    in float32 on `device`, stored where and as W is: fp8 storage too); after it, whatever happens,
    the original tensors are back. Every LoRA is checked before any weight changes."""
    for lora, _ in loras:
        check_lora_fits(lora, transformer)
    updates: dict[str, list[tuple[LoRALayer, float]]] = {}
    for lora, strength in loras:
        for module, layer in lora.layers.items():
            updates.setdefault(module, []).append((layer, strength))
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for module, layers in updates.items():
            weight = transformer.get_submodule(module).weight
            originals.append((weight, weight.data))
            weight.data = _merged_weight(weight.data, layers, device)
        yield
    finally:
        for weight, data in originals:
            weight.data = data


def _merged_weight(weight: torch.Tensor, layers: list[tuple[LoRALayer, float]], device) -> torch.Tensor:
    where = torch.device(device) if device is not None else weight.device
    total = weight.to(where, torch.float32, copy=True)
    for layer, strength in layers:
        update = layer.up.to(where, torch.float32) @ layer.down.to(where, torch.float32)
        total += update * (strength * layer.scale)
    return total.to(weight.device, weight.dtype)
