"""nodes/native/comfy_parts.py: assumptions, refusals outside ComfyUI, the reference noise, the native features
in-process in ComfyUI (each internal broken: test_comfyui_fence.py; parity: test_native_parity.py)."""

import re

import pytest
import torch

from native_tools import NATIVE_COGVIDEOX, import_comfyui
from node_tools import NEEDS_COMFYUI
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import fence  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402


def test_every_native_feature_is_named_native_and_off_without_native_cogvideox():
    first, *rest = comfy_parts.ASSUMPTIONS
    assert first.feature == "native_cogvideox" and first.without == comfy_parts.UNAVAILABLE
    for assumption in rest:
        assert assumption.feature.startswith("native_") and assumption.needs is not None
    assert set(comfy_parts.FACE_MODEL) <= {a.feature for a in rest}


def test_outside_comfyui_the_native_nodes_refuse_in_one_line():
    assert not comfy_parts.AVAILABLE
    for feature in ("native_cogvideox", comfy_parts.FACE_MODEL, "native_lora"):
        message = assert_refused(lambda: comfy_parts.require(feature, "an option"), "^" + re.escape(
            "the native ConsisID nodes need ComfyUI's own CogVideoX (comfy.ldm.cogvideo, ComfyUI v0.21 or later)"),
            fence.ComfyApiError, exact=True)
        assert message.endswith("or use the ConsisID wrapper nodes (ConsisID Model Loader, ConsisID Sampler)")


def test_an_instance_without_an_attribute_the_path_uses_is_refused_naming_it():
    class Vae:
        first_stage_model = None

    comfy_parts.instance_parts(Vae(), ("first_stage_model",), "its VAE", "Decode")
    message = assert_refused(lambda: comfy_parts.instance_parts(Vae(), ("first_stage_model", "memory_used_decode"),
                                                                  "its VAE", "ConsisID Native VAE Decode"),
                             "^ConsisID Native VAE Decode needs ComfyUI internals", fence.ComfyApiError)
    assert "(its VAE lacks memory_used_decode)" in message


def test_the_reference_noise_is_one_draw_per_seed_in_comfyuis_layout():
    latent = {"samples": torch.zeros(1, 4, 3, 8, 12)}
    noise = comfy_parts.ReferenceNoise(7).generate_noise(latent)
    assert noise.shape == (1, 4, 3, 8, 12)
    assert torch.equal(noise, comfy_parts.ReferenceNoise(7).generate_noise(latent))
    assert not torch.equal(noise, comfy_parts.ReferenceNoise(8).generate_noise(latent))
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


@pytest.mark.comfyui
@pytest.mark.slow  # imports ComfyUI in-process: seconds
@NEEDS_COMFYUI
def test_inside_comfyui_the_native_features_work_where_it_has_native_cogvideox():
    import_comfyui()
    from consisid_pack.nodes import fence as inside
    from consisid_pack.nodes.native import comfy_parts as parts

    found = inside.check()
    native = {a.feature: found[a.feature] for a in parts.ASSUMPTIONS}
    if NATIVE_COGVIDEOX:
        assert parts.AVAILABLE and native == {feature: [] for feature in native}
        parts.require(parts.FACE_MODEL, "the native MODEL")
    else:
        assert not parts.AVAILABLE and native["native_cogvideox"] == ["comfy.ldm.cogvideo"]
        assert_refused(lambda: parts.require(), re.escape(parts.UNAVAILABLE), inside.ComfyApiError)
