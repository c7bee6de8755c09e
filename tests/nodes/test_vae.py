"""nodes/vae.py: ConsisID VAE Decode, plain and tiled, and its refusal of what is not a ConsisID
latent before the decoder runs."""

import math

import pytest
import torch

from node_tools import calls, model  # noqa: F401 (fixtures)
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

DECODE = NODE_CLASS_MAPPINGS["ConsisIDVAEDecode"]


@pytest.mark.slow
def test_tiled_decode_node(home):
    n = NODE_CLASS_MAPPINGS
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    latent = {"samples": torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))}
    plain = n["ConsisIDVAEDecode"]().decode(model, latent, False, 32, 48, 16, False, 16)[0]
    tiled = n["ConsisIDVAEDecode"]().decode(model, latent, True, 32, 48, 16, True, 16)[0]
    assert plain.shape == tiled.shape == (9, 64, 96, 3)


@pytest.mark.parametrize(
    "latent, says",
    [
        ({"samples": torch.zeros(1, 4, 8, 12)},
         "this LATENT (float32 [1, 4, 8, 12]) is not a video latent [batch, channels, frames, h, w] of 4 channels "
         "with a frame in it: connect the LATENT of ConsisID Sampler"),
        ({"samples": torch.zeros(1, 16, 3, 8, 12)}, "this LATENT (float32 [1, 16, 3, 8, 12]) is not a video latent"),
        ({"samples": torch.zeros(0, 4, 3, 8, 12)}, "this LATENT (float32 [0, 4, 3, 8, 12]) is not a video latent"),
        ({"samples": torch.zeros(1, 4, 3, 8, 12, dtype=torch.int64)}, "this LATENT (int64 [1, 4, 3, 8, 12]) is not"),
        ({"samples": torch.full((1, 4, 3, 8, 12), math.nan)},
         "the LATENT: 'samples' holds NaN values: the sampling diverged; most often half-precision (fp16) weights"),
        ({"samples": torch.full((1, 4, 3, 8, 12), -math.inf)}, "the LATENT: 'samples' holds infinite values"),
        ({}, "this LATENT (NoneType) is not a video latent"),
        ({"samples": [[0.0]]}, "this LATENT (list) is not a video latent"),
        ("not a latent", "this LATENT (str) is not a video latent"),
    ],
)
def test_vae_decode_refuses_what_is_not_a_consisid_latent(model, calls, latent, says):
    message = assert_refused(lambda: DECODE().decode(model, latent, False, 240, 360, 40, 72, False), error=ConsisIDError)
    assert message.startswith(says)
    assert calls == []


def test_vae_decode_of_a_good_latent_runs_the_decoder(model, calls):
    (frames,) = DECODE().decode(model, {"samples": torch.zeros(1, 4, 1, 8, 12)}, False, 240, 360, 40, 72, False)
    assert frames.shape == (1, 64, 96, 3) and set(calls) == {"vae decoder"}
