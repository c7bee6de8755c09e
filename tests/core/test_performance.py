"""Speed and memory options: equal results where promised, hooks gone after every run."""

import logging

import pytest
import torch

from consisid_core.checkpoint import Checkpoint
from consisid_core.errors import ConsisIDError, GenerationCancelled
from consisid_core.diffusers_hooks import attention_hooks, hooked
from consisid_core.performance import Performance, StepCacheStats
from consisid_core.sampling import sample
from consisid_core.text import TextEmbeddings


@pytest.fixture(scope="module")
def model(tiny_dir):
    return Checkpoint.open(tiny_dir).load_model("fp32")


@pytest.fixture
def text(model):
    g = torch.Generator().manual_seed(0)
    width = model.config.text_embed_dim
    return TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))


def _hooks_left(module: torch.nn.Module) -> list[str]:
    return [
        f"{name}:{hook}"
        for name, sub in module.named_modules()
        if getattr(sub, "_diffusers_hook", None) is not None
        for hook in sub._diffusers_hook.hooks
    ]


class Calls:
    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.count += 1


@pytest.mark.slow
def test_identity_tokens_are_computed_once_per_run(model, identity, text):
    calls = Calls(model.transformer.local_facial_extractor.id_embedding_mapping)
    try:
        sample(model, identity, text, steps=4)
        assert calls.count == 1
        sample(model, identity, text, steps=3)
        assert calls.count == 2
    finally:
        calls.handle.remove()
    assert _hooks_left(model.transformer) == []


def test_hooks_are_removed_when_a_run_stops(model, identity, text):
    def stop(step, total, latents):
        raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        sample(model, identity, text, steps=4, callback=stop, performance=Performance(step_cache=0.5))
    assert _hooks_left(model.transformer) == []


@pytest.mark.slow
def test_step_cache_off_changes_nothing_and_on_skips_steps(model, identity, text, caplog):
    plain = sample(model, identity, text, steps=8)
    assert torch.equal(plain, sample(model, identity, text, steps=8, performance=Performance(step_cache=0.0)))
    computed = Calls(model.transformer.transformer_blocks[0].attn1)
    stats = StepCacheStats()
    try:
        with caplog.at_level(logging.INFO, logger="consisid_core.performance"):
            cached = sample(model, identity, text, steps=8, performance=Performance(step_cache=5.0),
                            step_cache_stats=stats)
    finally:
        computed.handle.remove()
    assert 2 <= computed.count < 8  # the first and the last step are always computed
    assert (stats.computed, stats.skipped) == (computed.count, 8 - computed.count)
    assert f"{computed.count} transformer forwards computed, {8 - computed.count} skipped" in caplog.text
    assert torch.isfinite(cached).all()
    assert 0 < (cached - plain).abs().max() < 10 * plain.abs().max()
    assert _hooks_left(model.transformer) == []


def test_sequential_offload_gives_the_same_latents(model, identity, text):
    plain = sample(model, identity, text, steps=3, device="cpu")
    streamed = sample(model, identity, text, steps=3, device="cpu", performance=Performance(offload="sequential"))
    assert torch.equal(plain, streamed)
    assert _hooks_left(model.transformer) == []


@pytest.mark.slow
def test_compiled_blocks_give_the_same_latents_and_are_undone(model, identity, text):
    plain = sample(model, identity, text, steps=2)
    compiled = sample(model, identity, text, steps=2, performance=Performance(compile=True))
    assert (compiled - plain).abs().max() <= 1e-4
    assert all(block._compiled_call_impl is None for block in model.transformer.transformer_blocks)


class SdpaKernel:
    """Stands in for SageAttention's `sageattn` (CUDA only): its call signature, exact SDPA inside."""

    def __init__(self):
        self.shapes = []

    def __call__(self, q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "HND" and not is_causal
        self.shapes.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale)


def test_attention_kernel_route_takes_every_blocks_attention(model, identity, text):
    plain = sample(model, identity, text, steps=2)
    kernel = SdpaKernel()
    blocks = len(model.transformer.transformer_blocks)
    with hooked(attention_hooks(model.transformer, kernel)):
        routed = sample(model, identity, text, steps=2)
    assert torch.equal(routed, plain)
    config = model.config
    patches = (config.sample_height // config.patch_size) * (config.sample_width // config.patch_size)
    tokens = 226 + ((config.sample_frames - 1) // 4 + 1) * patches  # text, then latent frames × patches
    # 2 steps × a guided batch of 2 in one forward each, every block once
    assert kernel.shapes == [(2, config.num_attention_heads, tokens, config.attention_head_dim)] * (2 * blocks)
    assert _hooks_left(model.transformer) == []


def test_sage_attention_is_refused_where_it_cannot_run(model, identity, text):
    refused = "attention 'sage' (needs SageAttention: pip install sageattention|runs on CUDA GPUs only, not on cpu)"
    with pytest.raises(ConsisIDError, match=refused):
        sample(model, identity, text, steps=2, device="cpu", performance=Performance(attention="sage"))
    assert _hooks_left(model.transformer) == []


@pytest.mark.slow
def test_fp8_storage_keeps_the_face_layers_and_stays_close(tiny_dir, model, identity, text):
    fp8 = Checkpoint.open(tiny_dir).load_model("fp32", fp8=True)
    blocks, face = fp8.transformer.transformer_blocks[0], fp8.transformer.local_facial_extractor
    assert blocks.ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert blocks.attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert face.layers[0][0].to_q.weight.dtype == torch.float32
    assert fp8.transformer.perceiver_cross_attention[0].to_q.weight.dtype == torch.float32
    assert fp8.dtype == torch.float32
    plain = sample(model, identity, text, steps=3)
    stored = sample(fp8, identity, text, steps=3)
    assert 0 < (stored - plain).abs().max() < 0.1 * plain.abs().max()


def test_bad_options():
    with pytest.raises(ConsisIDError, match="offload 'disk' is not one of model, sequential"):
        Performance(offload="disk")
    with pytest.raises(ConsisIDError, match="step cache threshold -1"):
        Performance(step_cache=-1)
    with pytest.raises(ConsisIDError, match="attention 'flash' is not one of sdpa, sage"):
        Performance(attention="flash")
