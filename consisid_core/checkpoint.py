"""The checkpoint folder: its layout, checked before anything loads, and its components loaded.

A checkpoint folder is laid out like the Hub repo `BestWishYsh/ConsisID-preview`:

    model_index.json      names ConsisIDPipeline
    transformer/          ConsisIDTransformer3DModel, config.json + safetensors
    vae/                  AutoencoderKLCogVideoX, config.json + safetensors
    text_encoder/         T5EncoderModel, config.json + safetensors
    tokenizer/            T5 tokenizer (spiece.model)
    scheduler/            CogVideoXDPMScheduler config
    face_encoder/         the face models (FACE_ENCODER below), read by `face.load_face_models`

Components load from local files only, in the dtype the caller picks, into a `ConsisIDModel`.
`single_file.py` loads the transformer and VAE from single files instead.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import diffusers_hooks as hooks
from .checks import check_config, check_face_rules, check_module_weights, class_defaults
from .decoder import speed_up_decoder
from .errors import CheckpointError, first_line
from .files import safetensors_header, shown

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE_CLASS = "ConsisIDPipeline"
EXPECTED_LAYOUT = "model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/, face_encoder/"

FACE_ENCODER = "face_encoder"
"""The face models' folder. `open` does not require it (a model used with identity files needs no
face models); `face.load_face_models` says which of these files is missing when it loads them."""
ANTELOPE_DIR = Path("models") / "antelopev2"
"""insightface's antelopev2 models, inside face_encoder/."""
DETECTION_FILE = "scrfd_10g_bnkps.onnx"
"""In ANTELOPE_DIR: the insightface detector (SCRFD, 5 keypoints)."""
RECOGNITION_FILE = "glintr100.onnx"
"""In ANTELOPE_DIR: the insightface recogniser (ArcFace, 512-d)."""
RETINAFACE_FILE = "detection_Resnet50_Final.pth"
"""facexlib RetinaFace (aligns the face)."""
BISENET_FILE = "parsing_bisenet.pth"
"""facexlib BiSeNet (face parsing)."""
EVA_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
"""EVA02-CLIP-L-14-336 (its vision tower is used)."""

# component -> (files that must all exist, alternatives of which one must exist, unsafe formats)
_COMPONENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "transformer": (
        ("config.json",),
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    ),
    "vae": (
        ("config.json",),
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        ("diffusion_pytorch_model.bin",),
    ),
    "text_encoder": (
        ("config.json",),
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
    "tokenizer": ((), ("spiece.model", "tokenizer.json"), ()),
    "scheduler": (("scheduler_config.json",), (), ()),
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"dtype '{name}' is not one of {', '.join(DTYPES)}") from None


MAX_JSON_BYTES = 2**20
"""Config and index files are a few kB (a sharded T5-XXL index about 50 kB)."""


def read_json(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size <= MAX_JSON_BYTES:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"'{path}' is not a readable JSON file ({str(e)[:200]})") from None
    if size > MAX_JSON_BYTES:  # refused unread
        raise CheckpointError(
            f"'{path}' is over {MAX_JSON_BYTES // 1024} kB: not a config or index file; "
            "use the checkpoint's original one"
        )
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object of settings, found a {type(data).__name__}")
    return data


def effective_config(config: Mapping, component: str, where) -> dict:
    """The config diffusers builds a component from (its defaults under the file's values),
    every number in it checked (`checks.CONFIG_RULES`)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, ConsisIDTransformer3DModel

    cls = {"transformer": ConsisIDTransformer3DModel, "vae": AutoencoderKLCogVideoX}.get(
        component, CogVideoXDPMScheduler
    )
    if component == "transformer":
        _check_transformer_config(config, where)
    effective = check_config(config, cls.__name__, str(where), class_defaults(cls))
    if component == "transformer":  # what diffusers would fail on when building or sampling
        check_face_rules(effective, str(where))
    if component == "vae":
        counts = {len(effective[k]) for k in ("block_out_channels", "down_block_types", "up_block_types")}
        if len(counts) != 1:
            raise CheckpointError(
                f"'{where}': block_out_channels, down_block_types and up_block_types must be lists of the same "
                "length; use the checkpoint's original config.json"
            )
    return effective


@dataclass(frozen=True)
class ConsisIDModel:
    """What sampling needs: the transformer, the VAE and the scheduler config.

    `checkpoint` is the folder it came from, when there is one: its T5 text encoder and face
    models load from there on demand. `loras` are LoRAs with their strengths, merged into the
    transformer's weights only while a run uses this model (`lora.with_loras`, `lora.merged`).
    """

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: Mapping
    checkpoint: Checkpoint | None = None
    loras: tuple = ()

    @property
    def config(self) -> Mapping:
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


@dataclass(frozen=True)
class Checkpoint:
    """A validated ConsisID checkpoint folder. Components load on demand."""

    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        root = Path(path)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise CheckpointError(
                f"ConsisID checkpoint folder '{root}' {what}; expected a folder laid out like "
                f"BestWishYsh/ConsisID-preview ({EXPECTED_LAYOUT})"
            )
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise CheckpointError(
                f"'{root}' is not a diffusers checkpoint folder: model_index.json is missing "
                f"(found: {_listing(root)}); expected {EXPECTED_LAYOUT}"
            )
        index = read_json(index_path)
        if index.get("_class_name") != PIPELINE_CLASS:
            raise CheckpointError(
                f"'{index_path}' names the pipeline '{index.get('_class_name')}', expected "
                f"'{PIPELINE_CLASS}': this is not a ConsisID checkpoint"
            )
        for name, (required, one_of, unsafe) in _COMPONENTS.items():
            _check_component(root / name, name, required, one_of, unsafe)
        checkpoint = cls(root)
        checkpoint.transformer_config, checkpoint.vae_config, checkpoint.scheduler_config  # noqa: B018 - checked now
        return checkpoint

    @functools.cached_property
    def _configs(self) -> dict[str, dict]:
        """The transformer's, the VAE's and the scheduler's configs, read and checked once."""
        configs = {}
        for component, name in (("transformer", "config.json"), ("vae", "config.json"),
                                 ("scheduler", "scheduler_config.json")):
            path = self.root / component / name
            config = read_json(path)
            effective = effective_config(config, component, path)
            configs[component] = config if component == "scheduler" else effective
        return configs

    @property
    def transformer_config(self) -> dict:
        """The transformer's config.json with diffusers' defaults for what it leaves out, checked."""
        return dict(self._configs["transformer"])

    @property
    def vae_config(self) -> dict:
        """The VAE's config.json with diffusers' defaults for what it leaves out, checked."""
        return dict(self._configs["vae"])

    @property
    def face_encoder_dir(self) -> Path:
        return self.root / FACE_ENCODER

    def load_transformer(self, dtype: str | torch.dtype = "bf16") -> torch.nn.Module:
        from diffusers import ConsisIDTransformer3DModel

        return _from_pretrained(ConsisIDTransformer3DModel, self.root / "transformer", dtype_from_name(dtype))

    def load_vae(self, dtype: str | torch.dtype = "bf16") -> torch.nn.Module:
        from diffusers import AutoencoderKLCogVideoX

        return speed_up_decoder(_from_pretrained(AutoencoderKLCogVideoX, self.root / "vae", dtype_from_name(dtype)))

    @property
    def scheduler_config(self) -> dict:
        """The scheduler's config as written (checked with diffusers' defaults)."""
        return dict(self._configs["scheduler"])

    def parameter_count(self, component: str) -> int:
        """Parameters of a component (`text_encoder`, `transformer`, `vae`), from its .safetensors
        headers alone."""
        return sum(
            math.prod(shape)
            for path in sorted((self.root / component).glob("*.safetensors"))
            for shape in _shapes(path).values()
        )

    def load_tokenizer(self):
        """The checkpoint's T5 tokenizer."""
        from transformers import T5Tokenizer

        folder = self.root / "tokenizer"
        refused = f"'{folder}' is not a valid T5 tokenizer: it needs T5's SentencePiece model, spiece.model"
        fix = "download the checkpoint's tokenizer folder again"
        if (folder / "spiece.model").is_file():  # transformers would try other formats on a damaged one, and say so
            import sentencepiece

            try:
                sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            except (RuntimeError, OSError) as e:
                said = first_line(e)
                raise CheckpointError(f"{refused}, and its spiece.model does not read as one ({said}); {fix}") from None
        try:
            return T5Tokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError(f"{refused} (loading it said: {first_line(e)}); {fix}") from None

    def load_text_model(self, dtype: str | torch.dtype = "bf16") -> torch.nn.Module:
        """The checkpoint's T5 encoder (`text.load_text_encoder` pairs it with its tokenizer)."""
        from transformers import T5EncoderModel

        return _from_pretrained(T5EncoderModel, self.root / "text_encoder", dtype_from_name(dtype))

    def load_model(
        self,
        dtype: str | torch.dtype = "bf16",
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        fp8: bool = False,
    ) -> ConsisIDModel:
        """Transformer, VAE (this folder's, or ones loaded from single files) and scheduler.

        `fp8` stores the transformer's linear layers in float8 (see `enable_fp8_storage`).
        """
        if transformer is None:
            transformer = self.load_transformer(dtype)
            if fp8:
                enable_fp8_storage(transformer)
        elif fp8:
            raise CheckpointError("fp8 storage applies when the transformer is loaded; pass fp8 to load_transformer_file")
        model = ConsisIDModel(
            transformer,
            vae if vae is not None else self.load_vae(dtype),
            self.scheduler_config,
            self,
        )
        check_vae_fits(model)
        return model


def check_vae_fits(model: ConsisIDModel) -> None:
    latent = model.vae.config.latent_channels
    cfg = model.config
    if cfg.in_channels != 2 * latent or cfg.out_channels != latent:
        raise CheckpointError(
            f"the transformer takes {cfg.in_channels} input and gives {cfg.out_channels} output channels, "
            f"the VAE has {latent} latent channels (needs {2 * latent} in, {latent} out): "
            "use the VAE of the same ConsisID checkpoint"
        )


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        return safetensors_header(path)[0]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable .safetensors file ({e})") from None


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", … ({len(names)} entries)" if len(names) > limit else "")


def _check_component(folder: Path, name: str, required, one_of, unsafe) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"the checkpoint has no {name}/ folder: '{folder}' is missing; expected {EXPECTED_LAYOUT}")
    for fname in required:
        if not (folder / fname).is_file():
            raise CheckpointError(f"'{folder / fname}' is missing (found in {name}/: {_listing(folder)})")
    if one_of and not any((folder / f).is_file() for f in one_of):
        if any((folder / f).is_file() for f in unsafe):
            raise CheckpointError(
                f"'{folder}' holds its weights only as pickled .bin files, which are not loaded for safety; "
                f"convert them to .safetensors (expected {' or '.join(one_of)})"
            )
        raise CheckpointError(f"'{folder}' has none of {', '.join(one_of)} (found: {_listing(folder)})")
    for index in (f for f in one_of if f.endswith(".index.json")):
        if (folder / index).is_file():
            _check_shards(folder / index)


def _check_shards(index: Path) -> None:
    """A sharded component's index may name only .safetensors files beside it."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{index}' has no weight_map of tensor names to shard files; download it again")
    for shard in sorted({str(v) for v in weight_map.values()}):
        if not shard.endswith(".safetensors"):
            raise CheckpointError(
                f"'{index}' names the shard '{shown(shard)}', which is not a .safetensors file: pickled shards are "
                "not loaded for safety; convert them to .safetensors"
            )
        if Path(shard).name != shard or shard.startswith("."):
            raise CheckpointError(
                f"'{index}' names the shard '{shown(shard)}' outside its folder; only files beside it load"
            )
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"'{index}' names the shard '{shown(shard)}', which is missing; download it again")


def _check_transformer_config(config: Mapping, where: Path | str) -> None:
    if config.get("_class_name", "ConsisIDTransformer3DModel") != "ConsisIDTransformer3DModel":
        raise CheckpointError(
            f"'{where}' describes a {config.get('_class_name')}, expected a ConsisIDTransformer3DModel"
        )
    if not config.get("is_train_face", False):
        raise CheckpointError(
            f"'{where}' has is_train_face off: that transformer has no identity modules, "
            "so it is not a ConsisID checkpoint"
        )


LOAD_ERRORS = (
    OSError, ValueError, RuntimeError, SafetensorError, TypeError, KeyError, IndexError, AttributeError, AssertionError
)
"""What diffusers and transformers raise for a damaged folder: shown as one line."""


def _key_names(keys) -> list[str]:
    return sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys or ())


def _from_pretrained(cls, folder: Path, dtype: torch.dtype):
    for path in sorted(folder.glob("*.safetensors")):
        check_float_weights(path)
    try:
        model, info = cls.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except LOAD_ERRORS as e:
        raise CheckpointError(f"'{folder}' does not load as a {cls.__name__}: {_load_failure(e)}") from None
    # diffusers and transformers fill a tensor missing from the files with random values (or leave
    # it on the meta device): refused. Tensors the config has no place for are dropped: that is
    # said, not refused, so that a released folder carrying an extra tensor still loads.
    problems = []
    for what, found in (("missing", "missing_keys"), ("of the wrong shape", "mismatched_keys")):
        names = _key_names(info.get(found))
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(shown(n) for n in names[:3])})")
    if problems:
        raise CheckpointError(
            f"'{folder}' does not load as a {cls.__name__}: its weights and config.json do not match, tensors "
            f"{'; '.join(problems)}; the files are incomplete or from different models, download the folder again"
        )
    unexpected = _key_names(info.get("unexpected_keys"))
    if unexpected:
        logger.warning(
            "'%s' holds %d tensor(s) its config.json has no place for (%s); they are not used. If the video "
            "looks wrong, the folder's config.json and weights come from different models",
            folder, len(unexpected), ", ".join(shown(n) for n in unexpected[:3]),
        )
    check_module_weights(model, f"'{folder}'")
    return model


_MISMATCH = re.compile(r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)")


def _load_failure(error: Exception) -> str:
    """What a failed load says, in one line. A weight of another shape than config.json builds is
    named as such: diffusers' hint to load it anyway as random weights (`low_cpu_mem_usage=False`,
    `ignore_mismatched_sizes=True`) would only make a broken model."""
    said = first_line(error, 300)
    mismatch = _MISMATCH.search(str(error))
    if mismatch is None:
        return said
    key, expected, found = mismatch.groups()
    return (
        f"its weight '{shown(key)}' is {found} in the files, the folder's config.json makes it {expected}: the "
        "weights and config.json come from different models; download the folder again"
    )


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
"""safetensors' names of the dtypes model weights are stored in."""


def check_float_weights(path: Path) -> None:
    """Refuse a .safetensors file holding a tensor of integers or booleans, from its header alone:
    loaded, it would be cast to floats and make a model of meaningless weights. (A file that does
    not read is left to the loader, which says what is wrong with it.)"""
    try:
        with safe_open(path, framework="pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError):
        return
    odd = next(((k, d) for k, d in dtypes.items() if d not in FLOAT_DTYPES), None)
    if odd is not None:
        raise CheckpointError(
            f"'{path}': '{shown(odd[0])}' holds {odd[1]} values, where a model's weights are floats: the file is "
            "not the model's weights (quantized or converted by another tool); use the checkpoint's original file"
        )


FACE_LAYERS = ("local_facial_extractor", "perceiver_cross_attention")


def enable_fp8_storage(transformer: torch.nn.Module) -> None:
    """Store the transformer's linear layers in float8 (e4m3), computing in its dtype: about half
    the memory of bf16 weights. The face layers, embeddings and norms keep their precision."""
    transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=transformer.dtype,
        skip_modules_pattern=hooks.fp8_skip_patterns("fp8 storage") + FACE_LAYERS,
    )

