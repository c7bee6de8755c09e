"""nodes/managed.py: plain fallbacks outside ComfyUI; in-process in ComfyUI a part loaded and taken out, layers
rebuilt castable (GPU memory and partial loads: comfy_gpu_memory.py, comfy_partial_load.py)."""

import pytest
import torch

from native_tools import import_comfyui
from node_tools import NEEDS_COMFYUI
from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes import managed  # noqa: E402


def test_outside_comfyui_the_models_are_the_core_ones_and_the_core_moves_them(tiny_model):
    assert managed.managed(tiny_model) is tiny_model and managed.owner(tiny_model) is None
    faces = object()
    assert managed.managed_faces(faces, torch.device("cpu")) is faces
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert managed.load([("vae", tiny_model.vae)], None, memory_required=10**12) == (device, True)
    assert managed.load([("vae", tiny_model.vae)], None, load_device=torch.device("meta")) == (torch.device("meta"), True)
    assert not managed.merges_loras_itself() and not managed.dynamic_vram()
    managed.unload(None, tiny_model.transformer)
    managed.after_run()
    assert next(tiny_model.transformer.parameters()).device.type == "cpu"


def test_a_held_part_tells_its_device_and_dtype():
    layers = torch.nn.Sequential(torch.nn.Embedding(4, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    held = managed.ConsisIDTransformer(layers)
    assert held.module is layers and held.device == torch.device("cpu") and held.get_dtype() == torch.bfloat16
    assert managed.ConsisIDVAE(torch.nn.Sequential()).get_dtype() == torch.float32


@pytest.mark.comfyui
@pytest.mark.slow  # imports ComfyUI in-process: seconds
@NEEDS_COMFYUI
def test_inside_comfyui_a_part_is_loaded_by_comfyui_and_taken_out_again(tiny_model):
    import_comfyui()
    import comfy.model_management as model_management

    from consisid_pack.nodes import managed as inside

    model = inside.managed(tiny_model)
    assert isinstance(model, inside.ManagedModel) and model.transformer is tiny_model.transformer
    part = torch.nn.Sequential(torch.nn.Linear(3, 3))
    device, core_moves = inside.load([("vae", part)], inside.owner(model))
    assert device == model_management.get_torch_device() and not core_moves
    patcher = inside.owner(model).held(part)
    assert isinstance(patcher.model, inside.ConsisIDVAE) and patcher.model.module is part
    assert any(loaded.model is patcher for loaded in model_management.current_loaded_models)
    inside.unload(inside.owner(model), part)
    assert not any(loaded.model is patcher for loaded in model_management.current_loaded_models)


@pytest.mark.comfyui
@pytest.mark.slow  # imports ComfyUI in-process: seconds
@NEEDS_COMFYUI
def test_inside_comfyui_plain_layers_are_rebuilt_castable_with_the_same_output():
    import_comfyui()
    import comfy.ops

    from consisid_pack.nodes import managed as inside

    class OwnForward(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    tied = torch.nn.Linear(4, 4)
    module = torch.nn.Sequential(torch.nn.Sequential(tied), torch.nn.LayerNorm(4), OwnForward(4, 4),
                                 torch.nn.Sequential(tied))  # tied: one layer in two places, as T5's embeddings
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    before = module(x)
    assert inside.make_castable(module) == 2  # the tied layer once, the subclass left
    assert isinstance(module[0][0], comfy.ops.disable_weight_init.Linear) and module[3][0] is module[0][0]
    assert isinstance(module[1], comfy.ops.disable_weight_init.LayerNorm) and type(module[2]) is OwnForward
    assert torch.equal(module(x), before)
