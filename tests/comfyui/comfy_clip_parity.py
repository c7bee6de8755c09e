"""Run by test_comfyui.py inside a ComfyUI source folder: ComfyUI's T5-XXL code (what CLIPLoader type
sd3 builds) and transformers' T5EncoderModel with the same tiny weights and the same tokenizer (the
T5 vocabulary ComfyUI ships): our text node's embeddings must equal the checkpoint-T5 route's."""

import os
import sys

sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.sd  # noqa: E402
import comfy.text_encoders.sd3_clip as sd3_clip  # noqa: E402
import torch  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

from workflow_tools import import_pack  # noqa: E402

import_pack()
from consisid_pack.consisid_core.text import TextEncoder, encode_text  # noqa: E402
from consisid_pack.nodes.text import encode_with_comfy_clip  # noqa: E402

SMALL = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
TOLERANCE = 1e-4

torch.manual_seed(0)
config = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, **SMALL)
t5 = T5EncoderModel(config).eval()
for p in t5.parameters():
    torch.nn.init.normal_(p, std=0.2)
tokenizer = T5TokenizerFast.from_pretrained(os.path.join(os.path.dirname(sd3_clip.__file__), "t5_tokenizer"))


class Target:
    params: dict = {}
    clip = sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True)
    tokenizer = sd3_clip.SD3Tokenizer


clip = comfy.sd.CLIP(Target(), model_options={"t5xxl_model_config": SMALL, "dtype": torch.float32})
missing, _ = clip.load_sd(t5.state_dict())
assert not missing, missing

cases = [
    ("A panda, dressed in a small, red jacket and a tiny hat, sits on a wooden stool in a bamboo forest.", ""),
    ("a woman smiling " * 120, "blurry, low quality"),  # longer than 226 tokens: truncated as diffusers does
]
for prompt, negative in cases:
    ours = encode_with_comfy_clip(clip, prompt, negative)
    reference = encode_text(TextEncoder(tokenizer, t5), prompt, negative)
    diff = max((ours.positive - reference.positive).abs().max().item(), (ours.negative - reference.negative).abs().max().item())
    sys.stdout.write(f"{len(prompt)} characters: max |diff| {diff:.2e}\n")
    assert ours.positive.shape == (1, 226, 64), ours.positive.shape
    assert diff <= TOLERANCE, diff
