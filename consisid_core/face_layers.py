"""ConsisID's face layers as a `torch.nn.Module` of their own (`FaceLayers`): the Local Facial
Extractor and the perceiver cross-attentions, built from diffusers' own classes with diffusers'
key names, apart from the transformer (the native path adds them to core's CogVideoX).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch

from .checks import check_shapes
from .diffusers_hooks import part

FACE_CONFIG_KEYS = (
    "num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "sample_width", "sample_height",
    "cross_attn_interval", "cross_attn_dim_head", "cross_attn_num_heads", "LFE_id_dim", "LFE_vit_dim", "LFE_depth",
    "LFE_dim_head", "LFE_num_heads", "LFE_num_id_token", "LFE_num_querie", "LFE_output_dim", "LFE_ff_mult",
    "LFE_num_scale", "local_face_scale", "is_kps",
)
"""What the face layers, the rotary embedding and the identity checks need of the transformer config."""

REEXPORT = "use the checkpoint's original file, or export it again with `python -m consisid_core export`"
"""How to mend a weights file the native path refuses."""


def face_config(transformer_config: Mapping) -> dict:
    """The fields of a transformer config that the face layers and the rotary embedding use."""
    from diffusers import ConsisIDTransformer3DModel

    defaults = {k: v.default for k, v in _init_parameters(ConsisIDTransformer3DModel).items()}
    return {k: transformer_config.get(k, defaults.get(k)) for k in FACE_CONFIG_KEYS}


def _init_parameters(cls) -> Mapping:
    return inspect.signature(cls.__init__).parameters


class FaceLayers(torch.nn.Module):
    """ConsisID's face layers as diffusers builds them (same key names): the Local Facial Extractor
    and one perceiver cross-attention after every `cross_attn_interval` transformer blocks."""

    def __init__(self, config: Mapping, cancel: Callable[[], None] = lambda: None):
        """Built from a checked config (`native.read_face_file`, `native.source_weights`); `cancel` is called
        between the modules and may raise to stop the build."""
        super().__init__()
        LocalFacialExtractor, PerceiverCrossAttention = part("LocalFacialExtractor"), part("PerceiverCrossAttention")
        c = dict(config)
        inner = c["num_attention_heads"] * c["attention_head_dim"]
        self.config = c
        cancel()
        self.local_facial_extractor = LocalFacialExtractor(
            id_dim=c["LFE_id_dim"], vit_dim=c["LFE_vit_dim"], depth=c["LFE_depth"], dim_head=c["LFE_dim_head"],
            heads=c["LFE_num_heads"], num_id_token=c["LFE_num_id_token"], num_queries=c["LFE_num_querie"],
            output_dim=c["LFE_output_dim"], ff_mult=c["LFE_ff_mult"], num_scale=c["LFE_num_scale"],
        )
        self.perceiver_cross_attention = torch.nn.ModuleList()
        for _ in range(c["num_layers"] // c["cross_attn_interval"]):
            cancel()
            self.perceiver_cross_attention.append(PerceiverCrossAttention(
                dim=inner, dim_head=c["cross_attn_dim_head"], heads=c["cross_attn_num_heads"], kv_dim=int(inner / 3 * 2)))

    def face_tokens(self, id_cond: torch.Tensor, id_vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """The Local Facial Extractor's output, in the face layers' dtype."""
        dtype = self.local_facial_extractor.latents.dtype
        return self.local_facial_extractor(id_cond.to(dtype), [h.to(dtype) for h in id_vit_hidden])

    def after_block(self, index: int) -> int | None:
        """Which cross-attention follows transformer block `index` (None: none does)."""
        interval = self.config["cross_attn_interval"]
        if index % interval or index // interval >= len(self.perceiver_cross_attention):
            return None
        return index // interval

    def cross_attention(self, which: int, face: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """What cross-attention `which` adds to the hidden states (before the identity strength)."""
        layer = self.perceiver_cross_attention[which]
        dtype = layer.to_q.weight.dtype
        return layer(face.to(dtype), hidden_states.to(dtype)).to(hidden_states.dtype)



def face_layers(weights: Mapping[str, torch.Tensor], config: Mapping,
                cancel: Callable[[], None] = lambda: None) -> FaceLayers:
    """The face layers of a checked `config` holding `weights` (diffusers key names), checked key by
    key; `cancel` is called between the modules built."""
    with torch.device("meta"):
        modules = FaceLayers(face_config(config), cancel)
    expected = {k: tuple(v.shape) for k, v in modules.state_dict().items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in weights.items()}, "the face-layer weights", REEXPORT)
    modules.load_state_dict(dict(weights), assign=True, strict=True)
    return modules.eval()
