"""EVA02-CLIP vision tower (the ConsisID face encoder's "local facial extractor"), built with timm.

The checkpoint is the original EVA-CLIP `.pt` (`visual.*`, `text.*`, `logit_scale`); only `visual.*` is
used. Every size is read from the weights' shapes, so a tiny file loads through the same code as the
real `EVA02_CLIP_L_336_psz14_s6B.pt` (width 1024, depth 24, 16 heads, 336 px, patch 14, embed 768).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_tensors
from ..errors import FaceError, first_line
from ..files import load_torch_weights, shown

logger = logging.getLogger(__name__)

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)
"""Hidden states are taken ENTERING these blocks (CLS token included), as consisid_eva_clip does."""
DEFAULT_HEAD_WIDTH = 64
"""EVA02-CLIP-L's head width; used only when the checkpoint has no RoPE buffers to read it from."""
MAX_DEPTH = 128
"""EVA02-CLIP-L has 24 blocks; a depth is read from the largest block number in the file."""


@dataclass(frozen=True)
class EvaConfig:
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    embed_dim: int
    patch_size: int
    image_size: int


def eva_config_from_state_dict(visual: dict[str, torch.Tensor], where: str) -> EvaConfig:
    """Read the tower's sizes from `visual.*` weights (prefix already removed)."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.mlp.w1.weight")
    missing = [k for k in needed if k not in visual]
    if missing:
        raise FaceError(
            f"{where} is not an EVA02-CLIP checkpoint: missing visual.{', visual.'.join(missing)}. "
            "Use EVA02_CLIP_L_336_psz14_s6B.pt from the ConsisID checkpoint's face_encoder folder."
        )
    try:
        return _eva_config(visual, where)
    except (IndexError, ValueError, ZeroDivisionError, TypeError) as e:  # shapes of another rank or size
        if isinstance(e, FaceError):
            raise
        raise FaceError(
            f"{where} has shapes no EVA02-CLIP has ({e}); use EVA02_CLIP_L_336_psz14_s6B.pt from the ConsisID "
            "checkpoint's face_encoder folder"
        ) from None


def _eva_config(visual: dict[str, torch.Tensor], where: str) -> EvaConfig:
    width = visual["cls_token"].shape[-1]
    patch = visual["patch_embed.proj.weight"].shape[-1]
    tokens = visual["pos_embed"].shape[1] - 1
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise FaceError(f"{where}: pos_embed has {tokens} patch tokens, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in visual if (m := re.match(r"blocks\.([0-9]+)\.", k)))
    if depth > MAX_DEPTH:
        raise FaceError(f"{where} has a block number {depth - 1}; an EVA02-CLIP tower has at most {MAX_DEPTH} blocks")
    rope = next((visual[k] for k in ("rope.freqs_cos", "blocks.0.attn.rope.freqs_cos") if k in visual), None)
    head_dim = rope.shape[-1] if rope is not None else DEFAULT_HEAD_WIDTH
    if width % head_dim:
        raise FaceError(f"{where}: width {width} is not a multiple of the head width {head_dim}")
    return EvaConfig(
        width=width,
        depth=depth,
        heads=width // head_dim,
        mlp_hidden=visual["blocks.0.mlp.w1.weight"].shape[0],
        embed_dim=visual["head.weight"].shape[0],
        patch_size=patch,
        image_size=grid * patch,
    )


class EvaVisionTower(torch.nn.Module):
    """timm `Eva` configured as EVA02-CLIP's visual tower; `forward` returns (embedding, hidden states)."""

    def __init__(self, config: EvaConfig):
        super().__init__()
        try:
            from timm.models.eva import Eva
        except ImportError as e:
            raise ImportError("the ConsisID face encoder needs timm: pip install timm") from e
        if config.depth <= max(HIDDEN_BLOCKS):
            raise FaceError(
                f"the EVA tower has {config.depth} blocks; ConsisID needs hidden states entering block "
                f"{max(HIDDEN_BLOCKS)}, so at least {max(HIDDEN_BLOCKS) + 1} blocks"
            )
        self.config = config
        self.image_size = config.image_size
        self.image_mean = OPENAI_DATASET_MEAN
        self.image_std = OPENAI_DATASET_STD
        grid = config.image_size // config.patch_size
        self.model = Eva(
            img_size=config.image_size,
            patch_size=config.patch_size,
            num_classes=config.embed_dim,
            global_pool="token",
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.heads,
            qkv_bias=True,
            qkv_fused=False,
            mlp_ratio=config.mlp_hidden / config.width,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(16, 16) if grid != 16 else None,
        )
        hidden = self.model.blocks[0].mlp.fc1_g.out_features
        if hidden != config.mlp_hidden:  # mlp_ratio round-off: never silently build another size
            raise FaceError(f"EVA MLP width {config.mlp_hidden} cannot be built (timm gave {hidden})")

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels: [B, 3, S, S] normalised. Returns ([B, embed_dim], 5 × [B, 1 + tokens, width])."""
        indices = [i - 1 for i in HIDDEN_BLOCKS]  # the state entering block i is the output of block i-1
        final, inter = self.model.forward_intermediates(
            pixels, indices=indices, return_prefix_tokens=True, output_fmt="NLC", stop_early=False
        )
        hidden = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
        return self.model.forward_head(final), hidden


def load_face_weights(path: Path) -> dict[str, torch.Tensor]:
    """A face model's state dict (`.pth` / `.pt`), read safely and checked for NaN, Inf and absurd values."""
    state = load_torch_weights(path, FaceError)
    check_tensors(state.items(), f"'{path}'", "the file is damaged; download the face_encoder folder again", FaceError)
    return state


def check_state_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Refuse, in one line, a state dict whose keys or shapes are not `module`'s (RoPE buffers,
    computed from the sizes, may be absent)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in expected.keys() - state.keys() if "rope" not in k)
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    wrong = [f"{k}: {list(state[k].shape)}, expected {list(expected[k])}" for k in wrong]
    problems = [
        f"{len(keys)} {kind} ({', '.join(shown(k) for k in keys[:3])})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
        if keys
    ]
    if problems:
        raise FaceError(
            f"{where} does not fit {what}: tensors {'; '.join(problems)}; download the ConsisID checkpoint's "
            "face_encoder folder again"
        )


def load_eva_tower(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> EvaVisionTower:
    """Build the tower from an original EVA-CLIP `.pt` (keys `visual.*`) and load its weights.

    The tower is first built on the meta device (no memory) and the file checked against it, so
    that sizes read from a wrong file never allocate a model larger than the file."""
    from timm.models.eva import checkpoint_filter_fn

    path = Path(path)
    state = load_face_weights(path)
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    visual = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    config = eva_config_from_state_dict(visual, f"'{path}'")
    try:
        with torch.device("meta"):
            skeleton = EvaVisionTower(config)
        mapped = checkpoint_filter_fn(visual, skeleton.model)
    except (ValueError, ZeroDivisionError, RuntimeError, TypeError, IndexError) as e:
        if isinstance(e, FaceError):
            raise
        first = first_line(e)
        raise FaceError(
            f"'{path}' has sizes no EVA02-CLIP tower has ({first}); use EVA02_CLIP_L_336_psz14_s6B.pt from the "
            "ConsisID checkpoint's face_encoder folder"
        ) from None
    check_state_fits(skeleton.model, mapped, f"'{path}'", "the EVA02-CLIP vision tower")
    tower = EvaVisionTower(config)
    tower.model.load_state_dict(checkpoint_filter_fn(visual, tower.model), strict=False)
    logger.info("loaded EVA vision tower from %s: %s", path, config)
    return tower.eval().requires_grad_(False).to(device=device, dtype=dtype)
