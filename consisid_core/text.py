"""T5 text encoding with the reference's padding (226 tokens, truncated past that)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .checks import check_prompt, check_tensors
from .errors import ConsisIDError
from .memory import home_device, placed

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 226
"""Tokens per prompt: ConsisID's `max_text_seq_length`, what `ConsisIDPipeline` pads to."""


@dataclass(frozen=True)
class TextEncoder:
    tokenizer: object
    model: torch.nn.Module


@dataclass(frozen=True)
class TextEmbeddings:
    """A prompt and its negative, each [1, 226, text_dim] (4096 for the real T5-XXL)."""

    positive: torch.Tensor
    negative: torch.Tensor

    def __post_init__(self) -> None:
        for name, t in (("positive", self.positive), ("negative", self.negative)):
            if t.ndim != 3 or t.shape[0] != 1 or t.shape[1] != MAX_SEQUENCE_LENGTH:
                raise ConsisIDError(
                    f"{name} text embeddings must be [1, {MAX_SEQUENCE_LENGTH}, width], found {list(t.shape)}: "
                    f"pad or truncate the prompt to {MAX_SEQUENCE_LENGTH} tokens as the reference does"
                )
        if self.positive.shape != self.negative.shape:
            raise ConsisIDError(
                f"positive {list(self.positive.shape)} and negative {list(self.negative.shape)} text embeddings "
                "differ in shape: encode both with the same text encoder"
            )
        check_tensors(
            [("positive", self.positive), ("negative", self.negative)], "the text embeddings",
            "the text encoder's numbers overflowed or its weights are damaged: encode in bf16 or fp32",
        )


@torch.no_grad()
def encode_text(
    encoder: TextEncoder, prompt: str, negative_prompt: str = "", device=None, move_models: bool = True
) -> TextEmbeddings:
    """Encode exactly as `ConsisIDPipeline.encode_prompt` does (it is what runs here), on `device`:
    the T5 moves there for the call and back, unless `move_models` is off (already placed)."""
    from diffusers import ConsisIDPipeline

    check_prompt(prompt)
    check_prompt(negative_prompt, "negative prompt")
    device = torch.device(device) if device is not None else home_device(encoder.model)
    pipe = ConsisIDPipeline(
        tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=None, transformer=None, scheduler=None
    )
    with placed([encoder.model], device if move_models else None):
        positive, negative = pipe.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=device,
        )
    return TextEmbeddings(positive, negative)


def load_text_encoder(checkpoint: Checkpoint, dtype: str | torch.dtype = "bf16") -> TextEncoder:
    """A checkpoint folder's own T5 and tokenizer."""
    return TextEncoder(checkpoint.load_tokenizer(), checkpoint.load_text_model(dtype))


def own_text_encoder(checkpoint: Checkpoint | None, dtype: torch.dtype) -> TextEncoder:
    """A model's own T5: its checkpoint folder's (None for a model from single files: refused)."""
    if checkpoint is None:
        raise ConsisIDError(
            "this model was loaded from single files, so it has no T5 text encoder of its own: encode the "
            "prompt with another T5-XXL (in ComfyUI: CLIPLoader with the t5xxl file, type sd3)"
        )
    return load_text_encoder(checkpoint, dtype)


def encode_with_checkpoint(
    checkpoint: Checkpoint | None, dtype: torch.dtype, prompt: str, negative_prompt: str = "", device=None
) -> TextEmbeddings:
    """Encode with the checkpoint's own T5, loaded for this and released after."""
    return encode_all_with_checkpoint(checkpoint, dtype, [prompt], negative_prompt, device)[0]


def encode_all_with_checkpoint(
    checkpoint: Checkpoint | None, dtype: torch.dtype, prompts: Sequence[str], negative_prompt: str = "", device=None
) -> list[TextEmbeddings]:
    """Each of `prompts` (one per segment of a long video), with the checkpoint's own T5 loaded once
    for all and released after; a prompt given twice is encoded once."""
    for prompt in prompts:
        check_prompt(prompt)
    check_prompt(negative_prompt, "negative prompt")
    encoder = own_text_encoder(checkpoint, dtype)
    try:
        encoded = {prompt: encode_text(encoder, prompt, negative_prompt, device) for prompt in dict.fromkeys(prompts)}
    finally:
        del encoder
        gc.collect()
    return [encoded[prompt] for prompt in prompts]
