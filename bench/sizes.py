"""The benchmark's checkpoint sizes, and a builder that writes one in the real layout.

Every size is written by `make-tiny`'s own builder (`consisid_core.tiny.random_components` and
`save_components`: diffusers `save_pretrained` of the pipeline, a SentencePiece tokenizer built
locally) with random weights, so both paths load the same files through their own loaders. No
`face_encoder/`: the bench feeds identities directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consisid_core.single_file import RELEASED_TRANSFORMER_CONFIG, RELEASED_VAE_CONFIG
from consisid_core.tiny import TINY_TRANSFORMER, TINY_VAE, random_components, save_components, tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    name: str
    transformer: dict
    vae: dict
    frames: int
    height: int
    width: int
    steps: int
    repeats: int
    gpu_only: bool = False
    t5: dict = field(default_factory=dict)
    """Overrides for the (small, random) T5 written into text_encoder/; its width is text_embed_dim."""
    note: str = ""

    def describe(self) -> str:
        t = self.transformer
        width = t["num_attention_heads"] * t["attention_head_dim"]
        vae = self.vae.get("block_out_channels", (128, 256, 256, 512))
        return (
            f"transformer {t['num_layers']} layers × width {width} ({t['num_attention_heads']} heads × "
            f"{t['attention_head_dim']}), LFE vit {t['LFE_vit_dim']} × depth {t['LFE_depth']}, text width "
            f"{t['text_embed_dim']}; VAE channels {tuple(vae)}, {self.vae.get('latent_channels', 16)} latent; "
            f"{self.frames} frames at {self.width}×{self.height}"
        )


def _transformer(heads: int, layers: int) -> dict:
    """The released transformer with `heads` heads of 64 and `layers` blocks, its face
    cross-attention two thirds as wide (as ConsisID's)."""
    inner = heads * RELEASED_TRANSFORMER_CONFIG["attention_head_dim"]
    face = int(inner * 2 / 3)  # the cross-attention's key/value width
    return dict(
        RELEASED_TRANSFORMER_CONFIG, num_attention_heads=heads, num_layers=layers,
        cross_attn_num_heads=face // RELEASED_TRANSFORMER_CONFIG["cross_attn_dim_head"], LFE_output_dim=face,
    )


SIZES: dict[str, Size] = {
    "tiny": Size(
        "tiny",
        transformer=dict(TINY_TRANSFORMER),
        vae=dict(TINY_VAE),
        frames=9,
        height=64,
        width=96,
        steps=4,
        repeats=3,
        note="consisid_core.tiny's TINY_TRANSFORMER and TINY_VAE",
    ),
    "medium": Size(
        "medium",
        transformer=_transformer(heads=12, layers=8),
        vae=dict(RELEASED_VAE_CONFIG),  # AutoencoderKLCogVideoX's defaults: the real VAE architecture
        frames=9,
        height=160,
        width=240,
        steps=10,
        repeats=2,
        note="the real Local Facial Extractor and the real CogVideoX VAE; 8 transformer layers of width 768",
    ),
    "real": Size(
        "real",
        transformer=_transformer(heads=48, layers=42),
        vae=dict(RELEASED_VAE_CONFIG),
        frames=49,
        height=480,
        width=720,
        steps=10,
        repeats=2,
        gpu_only=True,
        note="ConsisID-preview's architecture (CogVideoX-5B-I2V + LFE); random weights",
    ),
}


def build_checkpoint(size: Size, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", text: str = "embeddings") -> Path:
    """Write `size` as a checkpoint folder (diffusers layout, random weights) into `directory`,
    with make-tiny's builder; its T5 is `t5_config(size, text, vocabulary)`."""
    t5 = t5_config(size, text, len(tokenizer()))
    save_components(random_components(size.transformer, size.vae, t5, seed, dtype, device), directory)
    logger.info("wrote the %s checkpoint to %s", size.name, directory)
    return directory


TEXT_MODES = ("embeddings", "t5")
"""`embeddings`: both paths get the same precomputed text embeddings; the checkpoint's T5 is small and
never run. `t5`: both paths encode the same prompt strings with a T5 whose share of the parameters is
the released checkpoint's (T5-XXL's encoder, 4.76 B, against the ≈5 B transformer: 0.95)."""

T5_SHARE = 0.95
"""T5 parameters / transformer parameters in the released checkpoint (4.76 B / ≈5 B)."""

_SMALL_T5 = dict(d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32)
# T5-XXL's encoder (google/t5-v1_1-xxl): d_model 4096, 64 heads × 64, gated-GELU, d_ff 10240, 24 layers
_T5_XXL = dict(d_kv=64, num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128)
_T5_XXL_FF = 10240
_T5_XXL_LAYERS = 24


def transformer_parameters(size: Size) -> int:
    """The transformer's parameter count, from its config alone (built on the meta device)."""
    from diffusers import ConsisIDTransformer3DModel

    with torch.device("meta"):
        model = ConsisIDTransformer3DModel(**size.transformer)
    return sum(p.numel() for p in model.parameters())


def t5_parameters(d_model: int, vocab: int, d_kv: int, num_heads: int, d_ff: int, num_layers: int,
                  relative_attention_num_buckets: int, **_) -> int:
    """T5EncoderModel's (gated) parameter count: shared embedding, per layer q/k/v/o, wi_0/wi_1/wo
    and two RMSNorms, the first layer's relative-position bias, the final norm."""
    inner = d_kv * num_heads
    layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab * d_model + num_layers * layer + relative_attention_num_buckets * num_heads + d_model


def t5_config(size: Size, text: str, vocab: int) -> dict:
    """The T5 written into text_encoder/ (T5Config fields other than vocab_size and d_model).

    `embeddings`, or the tiny size: a small T5 (never run with `embeddings`). `t5` at the real size:
    T5-XXL's encoder itself. `t5` at other sizes: T5-XXL's width
    (d_model = the transformer's text_embed_dim, 4096), heads (64 × 64) and gated GELU, with as many
    layers as T5-XXL's d_ff gives for T5_SHARE × the transformer's parameters (at least one), and
    d_ff (a multiple of 256) then fitted so the T5 comes as close to that share as it can.
    """
    if text not in TEXT_MODES:
        raise ValueError(f"text '{text}' is not one of {', '.join(TEXT_MODES)}")
    common = dict(feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    if text == "embeddings" or size.name == "tiny":
        return {**_SMALL_T5, **common, **size.t5}
    if size.name == "real":  # the released text encoder itself
        return {**_T5_XXL, "d_ff": _T5_XXL_FF, "num_layers": _T5_XXL_LAYERS, **common}
    d_model = size.transformer["text_embed_dim"]
    target = T5_SHARE * transformer_parameters(size)
    base = dict(_T5_XXL, d_model=d_model, vocab=vocab)
    per_layer = t5_parameters(**base, d_ff=_T5_XXL_FF, num_layers=1) - t5_parameters(**base, d_ff=_T5_XXL_FF, num_layers=0)
    layers = max(1, round(target / per_layer))
    without_ff = t5_parameters(**base, d_ff=0, num_layers=layers)
    d_ff = max(256, round((target - without_ff) / (3 * d_model * layers) / 256) * 256)
    return {**_T5_XXL, "d_ff": d_ff, "num_layers": layers, **common}


def folder_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
