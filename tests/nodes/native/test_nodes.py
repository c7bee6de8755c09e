"""nodes/native/nodes.py outside ComfyUI: lists, declared refusals, the one-line refusal without CogVideoX, Text
Conditioning and Noise (in ComfyUI: test_native_comfyui.py, test_native_parity.py, test_adversarial_native.py)."""

import re

import pytest
import torch

from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.consisid_core.text import TextEmbeddings  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS as NODES  # noqa: E402
from consisid_pack.nodes.native import comfy_parts  # noqa: E402

NEEDS_COMFYUI = [
    ("ConsisIDNativeModelLoader", lambda node: node.load("tiny", "default")),
    ("ConsisIDFaceModules", lambda node: node.apply(None, "tiny.safetensors")),
    ("ConsisIDIdentityConditioning",
     lambda node: node.encode([], [], None, None, 96, 64, 9, 1.0, 0.0, 1.0)),
    ("ConsisIDDPMSampler", lambda node: node.get_sampler(1)),
    ("ConsisIDNativeLoRA", lambda node: node.apply(None, "style.safetensors", 1.0)),
    ("ConsisIDNativeVAEDecode", lambda node: node.decode({"samples": torch.zeros(1, 16, 1, 8, 12)}, None)),
    ("ConsisIDDynamicCFG", lambda node: node.patch(None)),
]


@pytest.mark.parametrize("name, call", NEEDS_COMFYUI, ids=[name for name, _ in NEEDS_COMFYUI])
def test_outside_comfyui_each_native_node_says_it_needs_comfyuis_cogvideox(home, name, call):
    assert_refused(lambda: call(NODES[name]()), "^" + re.escape(comfy_parts.UNAVAILABLE) + "$",
                   comfy_parts.fence.ComfyApiError, unchanged=home)


def test_the_lists_are_the_model_folders_and_other_names_are_refused(home):
    loader, faces = NODES["ConsisIDNativeModelLoader"], NODES["ConsisIDFaceModules"]
    assert loader.INPUT_TYPES()["required"]["model"][0] == ["tiny", "diffusion_models/tiny.safetensors"]
    assert loader.VALIDATE_INPUTS(model="tiny") is True
    assert faces.VALIDATE_INPUTS(face_layers="tiny.safetensors") is True
    fix = "is not one of the choices; pick one from the list (refresh it after adding files)"
    assert loader.VALIDATE_INPUTS(model="../tiny") == f"model '../tiny' {fix}"
    assert faces.VALIDATE_INPUTS(face_layers="/tmp/x.safetensors") == f"face_layers '/tmp/x.safetensors' {fix}"
    assert NODES["ConsisIDNativeLoRA"].VALIDATE_INPUTS(lora_name="gone.safetensors") == (
        f"lora_name 'gone.safetensors' {fix}")


def test_text_conditioning_is_the_embeddings_as_conditioning():
    text = TextEmbeddings(torch.randn(1, 226, 8), torch.randn(1, 226, 8))
    positive, negative = NODES["ConsisIDTextConditioning"]().convert(text)
    assert positive[0][0] is text.positive and negative[0][0] is text.negative
    assert positive[0][1] == {} == negative[0][1] and len(positive) == len(negative) == 1
    assert_refused(lambda: NODES["ConsisIDTextConditioning"]().convert([[text.positive, {}]]),
                   "^text must be ConsisID Text Encode's output, found list$", ConsisIDError)


def test_noise_is_the_reference_noise_of_its_seed_and_refuses_other_seeds():
    latent = {"samples": torch.zeros(1, 16, 2, 4, 6)}
    (noise,) = NODES["ConsisIDNoise"]().get_noise(2**64 - 1)
    assert torch.equal(noise.generate_noise(latent), comfy_parts.ReferenceNoise(2**64 - 1).generate_noise(latent))
    for seed in (-1, 2**64, 1.5):
        assert_refused(lambda: NODES["ConsisIDNoise"]().get_noise(seed),
                       "^" + re.escape(f"noise_seed {seed} must be a whole number from 0 to "), ConsisIDError)
