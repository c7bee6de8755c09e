"""The fence around diffusers' internals (`consisid_core.diffusers_hooks`): break an assumption on
purpose, as a diffusers release could, and either the frames still equal stock diffusers' (with
one warning) or the option that needs it is refused before any work, with one line."""

import logging

import pytest
import torch

from consisid_core import diffusers_hooks
from consisid_core.checkpoint import Checkpoint
from consisid_core.diffusers_hooks import HookApiError
from consisid_core.performance import Performance
from consisid_core.sampling import generate, sample
from consisid_core.tiny import random_identity
from refusals import assert_refused
from parity_tools import NEGATIVE, PROMPT, TOLERANCE, reference_frames


def test_todays_diffusers_has_everything_the_hooks_stand_on(tiny_model):
    needs = ("registry", "blocks", "face", "attention", "offload", "compile")
    assert diffusers_hooks.problems(tiny_model.transformer, needs) == []


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(True))
    return calls


@pytest.mark.slow
def test_a_changed_hook_registry_falls_back_to_diffusers_forward_with_the_same_frames(tiny_dir, monkeypatch, caplog):
    """The identity-token cache (always on) needs diffusers' hook registry: when it behaves
    otherwise, the Local Facial Extractor runs every step as in diffusers, the frames are stock
    diffusers', and one warning says so."""
    from diffusers.hooks import HookRegistry

    def changed(self, hook, name, position=None):  # a registry that no longer swaps the forward
        self.hooks[name] = hook

    model = Checkpoint.open(tiny_dir).load_model("fp32")
    identity = random_identity(model.config, seed=21)
    theirs = reference_frames(tiny_dir, identity, steps=3, seed=8)
    monkeypatch.setattr(HookRegistry, "register_hook", changed)
    calls = _count_calls(model.transformer.local_facial_extractor)
    with caplog.at_level(logging.WARNING, logger="consisid_core.performance"):
        ours = generate(model, identity, PROMPT, NEGATIVE, steps=3, seed=8)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert len(calls) == 3  # once per step, as diffusers does (the cache would run it once in all)
    (warning,) = [r.getMessage() for r in caplog.records if "identity tokens are computed every step" in r.getMessage()]
    assert "the hook registry" in warning and "\n" not in warning


def _refused(model, identity, text, options: Performance, message: str) -> None:
    calls = _count_calls(model.transformer)
    assert_refused(lambda: sample(model, identity, text, steps=2, performance=options), message, HookApiError)
    assert calls == []


def test_a_changed_block_signature_refuses_the_step_cache_before_any_work(tiny_model, identity, text, monkeypatch):
    block = type(tiny_model.transformer.transformer_blocks[0])
    forward = block.forward

    def renamed(self, x, context, temb, image_rotary_emb=None):
        return forward(self, x, context, temb, image_rotary_emb)

    monkeypatch.setattr(block, "forward", renamed)
    _refused(tiny_model, identity, text, Performance(step_cache=0.2),
             r"the step cache is built on diffusers internals that this diffusers \(.*\) does not have as expected "
             r"\(ConsisIDBlock.forward\(hidden_states, encoder_hidden_states, …\)\): turn the step cache off")


def test_a_changed_face_attention_signature_refuses_the_step_cache(tiny_model, identity, text, monkeypatch):
    attention = type(tiny_model.transformer.perceiver_cross_attention[0])
    monkeypatch.setattr(attention, "forward", lambda self, latents, x: x)
    _refused(tiny_model, identity, text, Performance(step_cache=0.2), r"PerceiverCrossAttention.forward\(image_embeds")


def test_renamed_group_offloading_hooks_refuse_sequential_offload(tiny_model, identity, text, monkeypatch):
    from diffusers.hooks import group_offloading

    monkeypatch.delattr(group_offloading, "_LAYER_EXECUTION_TRACKER")
    _refused(tiny_model, identity, text, Performance(offload="sequential"),
             r"sequential offload is built on .*group_offloading._LAYER_EXECUTION_TRACKER")


def test_a_torch_without_compiled_call_impl_refuses_compile(tiny_model, identity, text, monkeypatch):
    monkeypatch.delattr(torch.nn.Module, "_compiled_call_impl")  # no module runs before the refusal
    _refused(tiny_model, identity, text, Performance(compile=True), r"torch.nn.Module._compiled_call_impl")


def test_a_vae_without_the_tiling_settings_refuses_tiling_in_one_line(tiny_model, monkeypatch):
    from consisid_core.tiling import Tiling
    from consisid_core.sampling import decode

    latents = torch.randn(1, 3, 4, 8, 12)
    plain = decode(tiny_model.vae, latents)
    monkeypatch.delattr(type(tiny_model.vae), "enable_tiling")
    with pytest.raises(Exception, match=r"VAE tiling and slicing are built on the VAE's settings \(enable_tiling") as refused:
        decode(tiny_model.vae, latents, tiling=Tiling(32, 48, 8, 8))
    assert "\n" not in str(refused.value)
    assert torch.equal(decode(tiny_model.vae, latents), plain)  # without tiling nothing is touched
