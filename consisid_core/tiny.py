"""`make-tiny`: a whole ConsisID checkpoint with tiny random weights, in the real formats.

Same layout and file formats as `BestWishYsh/ConsisID-preview` (it is written by diffusers'
`save_pretrained`), so it loads through exactly the code a real checkpoint does. The weights are
deterministic from the seed; the tokenizer is a SentencePiece model built here, not downloaded.

`make_tiny(..., native=True)` (`make-tiny --native`) writes the one that core ComfyUI's loaders also
take as they are, for the native path: a transformer whose shapes core's CogVideoX detection reads
right, and a VAE of the released architecture (core's VAE Loader builds only that one) with random
weights, in float16 (about 430 MB).
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import FACE_ENCODER
from .errors import ConsisIDError
from .face.tiny import write_tiny_face_encoder
from .identity import Identity
from .single_file import RELEASED_SCHEDULER_CONFIG, RELEASED_TRANSFORMER_CONFIG, RELEASED_VAE_CONFIG

logger = logging.getLogger(__name__)

TINY_TRANSFORMER = dict(
    RELEASED_TRANSFORMER_CONFIG,
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=8,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=2,
    sample_width=12,
    sample_height=8,
    sample_frames=9,
    cross_attn_interval=1,
    cross_attn_num_heads=1,
    LFE_id_dim=512 + 32,  # antelopev2's 512-d embedding + the tiny EVA's 32-d one
    LFE_vit_dim=32,  # the tiny EVA's width
    LFE_depth=5,
    LFE_num_heads=1,
    LFE_num_id_token=2,
    LFE_num_querie=4,
    LFE_output_dim=42,  # = int(2/3 of the transformer width), as ConsisID's cross-attention needs
    LFE_ff_mult=1,
)
"""Heads split as the released checkpoint's (64-d LFE heads, 128-d cross-attention heads), so
`single_file.infer_transformer_config` recovers this config from the weights alone."""

TINY_VAE = dict(  # 32 norm groups and 4x temporal compression as released: inferable from shapes
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    latent_channels=4,
    layers_per_block=1,
    temporal_compression_ratio=4,
    scaling_factor=0.7,
)

NATIVE_TINY_TRANSFORMER = dict(
    TINY_TRANSFORMER, num_attention_heads=1, attention_head_dim=64, in_channels=32, out_channels=16
)
"""TINY_TRANSFORMER as core ComfyUI's CogVideoX detection reads it (`comfy/model_detection.py`): it
takes the heads to be 64 wide and the model to be CogVideoX I2V (32 input channels, 16 output), as
the released checkpoint is."""

NATIVE_TINY_VAE = dict(RELEASED_VAE_CONFIG)
"""diffusers' AutoencoderKLCogVideoX defaults (the released architecture, about 215 M parameters)
with ConsisID's scaling factor; stored in float16, half the size of float32."""

_WORDS = "a the person man woman smiling video walking city street camera face light hair".split()


def _write_spiece_model(path: Path) -> None:
    """A small unigram SentencePiece model: T5's special ids, characters, a few words."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
        "identity", True, True, True,
    )
    piece_type = pb.ModelProto.SentencePiece
    pieces = [("<pad>", 0.0, piece_type.CONTROL), ("</s>", 0.0, piece_type.CONTROL), ("<unk>", 0.0, piece_type.UNKNOWN)]
    pieces += [("\u2581" + w, -1.0, piece_type.NORMAL) for w in _WORDS]
    pieces += [(c, -5.0, piece_type.NORMAL) for c in "\u2581" + string.ascii_letters + string.digits + string.punctuation]
    for text, score, kind in pieces:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    spec.vocab_size = len(model.pieces)
    path.write_bytes(model.SerializeToString())


TINY_T5 = dict(
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
)
"""T5Config fields of the tiny T5 but vocab_size and d_model (the tokenizer's and the transformer's
text_embed_dim)."""


def tokenizer():
    """The T5 tokenizer of `_write_spiece_model`'s SentencePiece model."""
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_spiece_model(Path(tmp) / "spiece.model")
        return T5Tokenizer.from_pretrained(tmp, local_files_only=True)


def random_components(
    transformer: Mapping,
    vae: Mapping,
    t5: Mapping,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict:
    """`ConsisIDPipeline`'s components from configs, with random weights drawn from `seed`.

    `transformer` and `vae` are the models' configs; `t5` the T5Config fields but vocab_size and
    d_model (as TINY_T5). Built on `device` in `dtype`; the scheduler is the released one's.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, ConsisIDTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    def cast(model: torch.nn.Module) -> torch.nn.Module:  # built in float32 (diffusers warns on any cast)
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    words = tokenizer()
    with torch.device(device):
        torch.manual_seed(seed)
        transformer_model = cast(ConsisIDTransformer3DModel(**transformer))
        torch.manual_seed(seed + 1)
        vae_model = cast(AutoencoderKLCogVideoX(**vae))
        torch.manual_seed(seed + 2)
        text_encoder = cast(T5EncoderModel(T5Config(vocab_size=len(words), d_model=transformer["text_embed_dim"], **t5)))
    return dict(
        tokenizer=words,
        text_encoder=text_encoder,
        vae=vae_model,
        transformer=transformer_model,
        scheduler=CogVideoXDPMScheduler.from_config(RELEASED_SCHEDULER_CONFIG),
    )


def save_components(components: Mapping, directory: str | os.PathLike) -> Path:
    """Write `random_components`' output into `directory` in the released checkpoint's layout
    (diffusers `save_pretrained`, the tokenizer as its SentencePiece model); no face_encoder/."""
    from diffusers import ConsisIDPipeline

    directory = Path(directory)
    ConsisIDPipeline(**components).save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    _write_spiece_model(directory / "tokenizer" / "spiece.model")
    return directory


def make_tiny(directory: str | os.PathLike, seed: int = 0, kps: bool = False, native: bool = False) -> Path:
    """Write a tiny ConsisID checkpoint to `directory` (new or empty) and return its path; with
    `native`, the one core ComfyUI's loaders take (see the module doc; it has no `is_kps` one).

    Written beside the target and moved into place at the end: a failure leaves nothing behind.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConsisIDError(f"'{target}' already exists and is not an empty folder; give make-tiny a new folder")
    if native and kps:
        raise ConsisIDError(
            "a native tiny checkpoint cannot have is_kps on (the native path refuses is_kps checkpoints): pick native or kps"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        transformer = NATIVE_TINY_TRANSFORMER if native else {**TINY_TRANSFORMER, "is_kps": kps}
        components = random_components(transformer, NATIVE_TINY_VAE if native else TINY_VAE, TINY_T5, seed)
        if native:
            components["vae"] = components["vae"].half()  # .half(): diffusers warns on .to(dtype)
        save_components(components, staging)
        write_tiny_face_encoder(staging / FACE_ENCODER, seed)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kind = "native " if native else ""
    logger.info("wrote a tiny %sConsisID checkpoint (seed %d, is_kps %s) to %s", kind, seed, kps, target)
    return target


def random_identity(transformer_config, seed: int = 0, face_size: int = 64) -> Identity:
    """An identity of the right shapes with random values, for demos and tests of sampling alone."""
    g = torch.Generator("cpu").manual_seed(seed)
    id_cond = torch.randn(1, transformer_config["LFE_id_dim"], generator=g)
    hidden = tuple(
        torch.randn(1, 577, transformer_config["LFE_vit_dim"], generator=g)
        for _ in range(transformer_config["LFE_num_scale"])
    )
    kps = torch.tensor([[22.0, 26.0], [42.0, 26.0], [32.0, 36.0], [24.0, 46.0], [40.0, 46.0]]) * face_size / 64
    face = torch.randint(0, 256, (face_size, face_size, 3), generator=g, dtype=torch.uint8)
    return Identity(id_cond, hidden, kps, face, {"source_image": f"random (seed {seed})", "face_models": "none"})
