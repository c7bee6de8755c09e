"""Text encode: the checkpoint's own T5, or a native ComfyUI CLIP holding T5-XXL, padded as the reference."""

from __future__ import annotations

import logging

from ..consisid_core.checks import check_prompt
from ..consisid_core.errors import ConsisIDError
from ..consisid_core.memory import TEXT_ENCODER_WORK
from ..consisid_core.text import (
    MAX_SEQUENCE_LENGTH,
    TextEmbeddings,
    encode_text,
    encode_with_checkpoint,
    own_text_encoder,
)
from . import fence, managed
from .declared import CONSISID_MODEL, CONSISID_TEXT

logger = logging.getLogger(__name__)

T5_END, T5_PAD = 1, 0


def _tokens_226(clip, text: str) -> dict:
    """ComfyUI T5 tokens for `text`, truncated and padded to 226 exactly as diffusers' tokenizer call
    (`padding="max_length", max_length=226, truncation=True`) does; prompt weights are off."""
    tokens, pairs = fence.t5_pairs(clip, text, MAX_SEQUENCE_LENGTH)
    if pairs is None:
        raise ConsisIDError(
            f"this CLIP has no T5-XXL (it has {', '.join(tokens) or 'nothing'}): load a t5xxl file with "
            "CLIPLoader, type sd3"
        )
    ids = [int(p[0]) for p in pairs]
    end = ids.index(T5_END) if T5_END in ids else len(ids)
    if end > MAX_SEQUENCE_LENGTH - 1:
        logger.warning("the prompt is %d tokens long; T5 sees the first %d, as in the reference", end, MAX_SEQUENCE_LENGTH - 1)
    kept = pairs[: min(end, MAX_SEQUENCE_LENGTH - 1)]
    padded = kept + [(T5_END, 1.0)] + [(T5_PAD, 1.0)] * (MAX_SEQUENCE_LENGTH - 1 - len(kept))
    return tokens | {"t5xxl": [padded]}


def encode_with_comfy_clip(clip, prompt: str, negative_prompt: str) -> TextEmbeddings:
    """Both prompts through a ComfyUI CLIP (CLIPLoader: t5xxl, type sd3 for the reference's numbers)."""
    check_prompt(prompt)
    check_prompt(negative_prompt, "negative prompt")
    embeddings = []
    for text in (prompt, negative_prompt):
        out = clip.encode_from_tokens(_tokens_226(clip, text), return_dict=True)
        if "attention_mask" in out:
            logger.warning(
                "this CLIP masks T5's padding (CLIPLoader type mochi); the reference does not: "
                "load the t5xxl file with type sd3 for the reference's embeddings"
            )
        cond = out["cond"]
        if cond.shape[1] != MAX_SEQUENCE_LENGTH:
            raise ConsisIDError(
                f"this CLIP gives {cond.shape[1]} tokens, not {MAX_SEQUENCE_LENGTH}: it holds more than T5-XXL; "
                "load only the t5xxl file with CLIPLoader (type sd3)"
            )
        embeddings.append(cond.float().cpu())
    return TextEmbeddings(*embeddings)


class ConsisIDTextEncode:
    DISPLAY_NAME = "ConsisID Text Encode"
    DESCRIPTION = (
        "Encodes the prompt and negative prompt with T5-XXL, padded to 226 tokens as the reference does: "
        "the checkpoint's own T5 (loaded for this and released), or a ComfyUI CLIP from CLIPLoader "
        "holding t5xxl (type sd3)."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "encode"
    RETURN_TYPES = (CONSISID_TEXT,)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("Positive and negative T5 embeddings, [1, 226, 4096] each.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": False,
                                      "tooltip": "What happens in the video. ConsisID likes long, detailed prompts."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False,
                                               "tooltip": "What to steer away from (empty as the reference's default)."}),
            },
            "optional": {
                "model": (CONSISID_MODEL, {"tooltip": "Encode with this checkpoint's own T5 (text_encoder/)."}),
                "clip": ("CLIP", {"tooltip": "Encode with this ComfyUI T5-XXL instead (CLIPLoader, type sd3)."}),
            },
        }

    def encode(self, prompt: str, negative_prompt: str, model=None, clip=None):
        if clip is not None:
            return (encode_with_comfy_clip(clip, prompt, negative_prompt),)
        if model is None:
            raise ConsisIDError("connect a ConsisID model (for its own T5) or a CLIP holding t5xxl to ConsisID Text Encode")
        owner = managed.owner(model)
        try:
            if owner is None:  # outside ComfyUI: loaded for this and released, as the CLI does
                text = encode_with_checkpoint(model.checkpoint, model.dtype, prompt, negative_prompt, managed.torch_device())
            else:  # kept in RAM once loaded, placed by ComfyUI as its own CLIP
                if owner.text_encoder is None:
                    owner.text_encoder = own_text_encoder(model.checkpoint, model.dtype)
                encoder = owner.text_encoder
                device, move_models = managed.load([("text_encoder", encoder.model)], owner, TEXT_ENCODER_WORK)
                text = encode_text(encoder, prompt, negative_prompt, device, move_models)
        finally:
            managed.after_run()
        return (TextEmbeddings(text.positive.cpu(), text.negative.cpu()),)


NODES = {"ConsisIDTextEncode": ConsisIDTextEncode}
