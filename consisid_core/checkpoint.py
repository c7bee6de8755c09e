"""The one place that knows a ConsisID checkpoint's layout and how to load it.

A checkpoint folder is laid out like the Hub repo `BestWishYsh/ConsisID-preview`:

    model_index.json      names ConsisIDPipeline
    transformer/          ConsisIDTransformer3DModel, config.json + safetensors
    vae/                  AutoencoderKLCogVideoX, config.json + safetensors
    text_encoder/         T5EncoderModel, config.json + safetensors
    tokenizer/            T5 tokenizer (spiece.model)
    scheduler/            CogVideoXDPMScheduler config
    face_encoder/         the face models (FACE_ENCODER below), read by `face.load_face_models`

The transformer also loads from one `.safetensors` file with diffusers key names (what people keep
in ComfyUI's `models/diffusion_models`), its config read from a checkpoint folder or inferred from
the weights' shapes. Everything loads from local files only, in the dtype the caller picks. The
VAE comes back with its decoder rebuilt by `decoder.speed_up_decoder` (same results, faster).
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
from .checks import check_config, check_face_rules, check_module_weights, check_tensors, class_defaults
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


def _read_json(path: Path) -> dict:
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


def _effective_config(config: Mapping, component: str, where) -> dict:
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
        index = _read_json(index_path)
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
            config = _read_json(path)
            effective = _effective_config(config, component, path)
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
            for shape in read_safetensors_shapes(path).values()
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


def check_vae_fits(model: ConsisIDModel) -> None:
    latent = model.vae.config.latent_channels
    cfg = model.config
    if cfg.in_channels != 2 * latent or cfg.out_channels != latent:
        raise CheckpointError(
            f"the transformer takes {cfg.in_channels} input and gives {cfg.out_channels} output channels, "
            f"the VAE has {latent} latent channels (needs {2 * latent} in, {latent} out): "
            "use the VAE of the same ConsisID checkpoint"
        )


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
    weight_map = _read_json(index).get("weight_map")
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


_LOAD_ERRORS = (
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
    except _LOAD_ERRORS as e:
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


# ---------------------------------------------------------------------------------------------
# The transformer from one .safetensors file

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

    What shapes cannot tell (how attention widths split into heads in the face modules, the
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
modules): its sizes and switches; ConsisIDTransformer3DModel's defaults for the rest. What weights'
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
    return _read_json(path)


def _build_config(config: Mapping, component: str, where) -> dict:
    """A file's own config as given (checked): what `from_config` receives."""
    _effective_config(config, component, where)
    return dict(config)


def _load_single_file(cls, path: Path, shapes: Mapping, config: Mapping, dtype: torch.dtype, what: str):
    """Build `cls` from `config` without memory, check every key and shape, then load the weights."""
    check_float_weights(path)
    try:
        with torch.device("meta"):
            model = cls.from_config(dict(config))
    except _LOAD_ERRORS as e:
        first = first_line(e, 300)
        raise CheckpointError(
            f"the {what} config for '{path}' does not build: {first}; pass the checkpoint's config"
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != tuple(shapes[k]))
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({', '.join(shown(k) for k in unexpected[:3])})")
        if wrong:
            problems.append(
                f"{len(wrong)} of the wrong shape ("
                + ", ".join(f"{k}: {list(shapes[k])}, expected {list(expected[k])}" for k in wrong[:3])
                + ")"
            )
        raise CheckpointError(
            f"'{path}' does not match the {what} config: keys {'; '.join(problems)}. "
            "Pass the config of the checkpoint this file came from"
        )
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


FACE_MODULES = ("local_facial_extractor", "perceiver_cross_attention")


def enable_fp8_storage(transformer: torch.nn.Module) -> None:
    """Store the transformer's linear layers in float8 (e4m3), computing in its dtype: about half
    the memory of bf16 weights. The face modules, embeddings and norms keep their precision."""
    transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=transformer.dtype,
        skip_modules_pattern=hooks.fp8_skip_patterns("fp8 storage") + FACE_MODULES,
    )


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
