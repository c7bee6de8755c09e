"""Our models in ComfyUI's model management: each part held by a ModelPatcher and loaded with
`load_models_gpu` (partly when it does not fit), LoRAs as ComfyUI weight patches, the compute
device. ComfyUI's internals are reached through `fence`; outside ComfyUI every function falls back
to plain behaviour (the core moves the models), so the nodes run in tests and scripts. How and why:
docs/dev/architecture.md, "Models inside ComfyUI"."""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from ..consisid_core.checkpoint import ConsisIDModel
from ..consisid_core.errors import ConsisIDError
from ..consisid_core.face.models import FaceModels
from ..consisid_core.lora import LoRA, with_loras
from ..consisid_core.memory import home_device
from . import fence
from .fence import IN_COMFYUI, comfy, model_management

logger = logging.getLogger(__name__)


def torch_device() -> torch.device:
    if fence.works("model_management"):
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Held(torch.nn.Module):
    """One of our modules as a ModelPatcher holds it. ModelPatcher sets a plain `device` attribute
    on what it holds, which diffusers' and transformers' read-only `device` property refuses;
    ComfyUI's log names the subclass ("Requested to load ConsisIDTransformer")."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.device = home_device(module)
        self._dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def get_dtype(self) -> torch.dtype:
        return self._dtype


class ConsisIDTransformer(Held):
    pass


class ConsisIDVAE(Held):
    pass


class ConsisIDTextEncoder(Held):
    pass


class ConsisIDFaceModels(Held):
    pass


_PARTS = {
    # part: (what ModelPatcher holds, loads partly: castable layers)
    "transformer": (ConsisIDTransformer, True),
    "text_encoder": (ConsisIDTextEncoder, True),
    "vae": (ConsisIDVAE, False),
    "face": (ConsisIDFaceModels, False),
}


def make_castable(module: torch.nn.Module) -> int:
    """Rebuild each plain torch layer of `module` as ComfyUI builds its own (`fence.twin`), in place:
    the same parameters and forward, plus the switch ComfyUI's partial loading uses to cast weights
    left in RAM to the GPU per call. Layers whose weights are stored in fp8 get `manual_cast`'s
    twin, which casts them per call as diffusers' layerwise casting did (its hooks go with the old
    layer). A layer held twice (T5's tied embeddings) stays one layer. Subclasses with forwards of
    their own are left as they are. Returns how many layers were rebuilt."""
    built: dict[int, torch.nn.Module] = {}
    for parent in list(module.modules()):
        for name, layer in list(parent.named_children()):
            if not fence.castable(layer):
                continue
            if id(layer) not in built:
                stored_apart = layer.weight is not None and torch.finfo(layer.weight.dtype).bits == 8
                operations = comfy.ops.manual_cast if stored_apart else comfy.ops.disable_weight_init
                built[id(layer)] = fence.twin(layer, operations)
            setattr(parent, name, built[id(layer)])
    return len(built)


def _move_direct(module: torch.nn.Module, device: torch.device) -> None:
    for part in module.modules():
        if next(part.children(), None) is None:
            continue
        for parameter in part.parameters(recurse=False):
            if parameter.device != device:
                parameter.data = parameter.data.to(device)


def _move_direct_parameters(patcher, device_to, *_args) -> None:
    """After a (partial) load: ModelPatcher moves leaf layers, so parameters held directly by a
    module with children (the Local Facial Extractor's `latents` and `proj_out`, a few MB) are
    moved here; a full unload moves everything back."""
    _move_direct(patcher.model, device_to)


def _direct_parameters_home(patcher, unpatch_all, *_args) -> None:
    """After a full unload: ComfyUI's dynamic patcher moves those parameters to the GPU with each
    load but leaves them there when it unloads; they go back to the offload device here."""
    if unpatch_all:
        _move_direct(patcher.model, patcher.offload_device)


def _held(patcher_class, module: Held, load_device: torch.device, offload_device: torch.device, castable: bool):
    """`module` held by a `patcher_class`: its plain layers made castable for ComfyUI's partial or
    dynamic loading (if `castable`), its direct parameters moved with each load and back after a
    full unload."""
    if castable:
        make_castable(module)
    patcher = patcher_class(module, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, _move_direct_parameters)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, _direct_parameters_home)
    return patcher


def dynamic_vram() -> bool:
    """Whether ComfyUI holds its own models in its dynamic patcher (v0.33's dynamic VRAM, on by
    default with an NVIDIA GPU): `CoreModelPatcher`, the class core builds its models' patchers
    from, is then `ModelPatcherDynamic`."""
    if not fence.works("dynamic_vram"):
        return False
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    return dynamic is not None and issubclass(comfy.model_patcher.CoreModelPatcher, dynamic)


class ConsisIDFaceLayers(Held):
    pass


def held_beside(model, module: torch.nn.Module, disable_dynamic: bool = False):
    """`module` (the native MODEL's face modules) in a patcher of its own, taken along by `model`'s
    loads: ComfyUI's sampling loads a MODEL's additional models with it, partly when they do not
    fit, and evicts and unloads them with it. The patcher is the MODEL's kind: core's dynamic one
    when the MODEL is dynamic (its layers then paged through dynamic VRAM), else the classic one.
    Its layers are castable as core's own, so what stays in RAM is cast per call. They are not an
    object patch of the MODEL: a dynamic patcher's full unload takes its object patches off before
    it puts back the weights it moved, and would then not find theirs. `disable_dynamic`: the
    classic patcher whatever the MODEL's (core asks its reload factories for that)."""
    castable = fence.works("partial_load")
    if not castable:
        patcher_class = WholeModelPatcher  # the fence has said so: loaded whole
    elif fence.works("dynamic_vram") and model.is_dynamic() and not disable_dynamic:
        patcher_class = comfy.model_patcher.CoreModelPatcher
    else:
        patcher_class = comfy.model_patcher.ModelPatcher
    return _held(patcher_class, ConsisIDFaceLayers(module), model.load_device, model.offload_device, castable)


@functools.cache
def _say_classic_beside_dynamic() -> None:
    if dynamic_vram():
        logger.info("ConsisID: dynamic VRAM is on; the ConsisID Model Loader's transformer and T5 stay in ComfyUI's "
                    "classic ModelPatcher beside it and load partly when they do not fit the free VRAM")


class WholeModelPatcher(getattr(comfy.model_patcher, "ModelPatcher", object) if IN_COMFYUI else object):
    """A ModelPatcher that always loads its model whole (the VAE, the face models): ComfyUI's
    partial load would leave layers that cannot be cast per call in RAM."""

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return super().partially_load(device_to, 1e32, force_patch_weights)


class Managed:
    """ComfyUI's handles on one loaded model's parts: a ModelPatcher each, made on first use; and
    the checkpoint's T5, kept in RAM once Text Encode has loaded it (as ComfyUI keeps its CLIP).
    A LoRA's model (`with_patches`) has its base's handles but for a clone of one patcher."""

    def __init__(self, base: Managed | None = None):
        self._patchers: dict[int, tuple] = {}
        self._base = base
        self._text_encoder = None
        self.parts = None

    @property
    def text_encoder(self):
        """The checkpoint's T5: one for a loaded model and the LoRAs' models made from it."""
        return self._base.text_encoder if self._base is not None else self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder) -> None:
        if self._base is not None:
            self._base.text_encoder = encoder
        else:
            self._text_encoder = encoder

    def held(self, module: torch.nn.Module):
        """The patcher holding `module`, None if none was made."""
        if id(module) in self._patchers:
            return self._patchers[id(module)][0]
        return self._base.held(module) if self._base is not None else None

    def with_patches(self, module: torch.nn.Module, patches: dict, strength: float) -> Managed:
        """These handles, but for `module` a clone of its patcher with ComfyUI weight `patches` added
        at `strength` (as ComfyUI's LoraLoader): ComfyUI patches the weights when it loads the clone
        and puts them back when it loads another patcher of the same module."""
        clone = self.patcher("transformer", module).clone()
        added = clone.add_patches(patches, strength)
        if len(added) != len(patches):
            raise ConsisIDError(f"this ComfyUI took {len(added)} of the LoRA's {len(patches)} weight patches")
        derived = Managed(self)
        derived._patchers[id(module)] = (clone, module)
        return derived

    def patcher(self, part: str, module: torch.nn.Module, load_device: torch.device | None = None):
        key = id(module)
        if key not in self._patchers and self._base is not None:
            return self._base.patcher(part, module, load_device)
        if key not in self._patchers:
            holder, castable = _PARTS[part]
            load = load_device if load_device is not None else model_management.get_torch_device()
            offload = {
                "transformer": model_management.unet_offload_device,
                "text_encoder": model_management.text_encoder_offload_device,
                "vae": model_management.vae_offload_device,
            }.get(part, model_management.unet_offload_device)()
            if castable and fence.works("partial_load"):
                _say_classic_beside_dynamic()
                patcher = _held(comfy.model_patcher.ModelPatcher, holder(module), load, offload, castable=True)
            else:
                patcher = WholeModelPatcher(holder(module), load_device=load, offload_device=offload)
            self._patchers[key] = (patcher, module)
        return self._patchers[key][0]


@dataclasses.dataclass(frozen=True, eq=False)
class ManagedModel(ConsisIDModel):
    """The Model Loader's output inside ComfyUI: the model and ComfyUI's handles on its parts
    (the checkpoint's T5 joins them when Text Encode first loads it)."""

    managed: Managed = dataclasses.field(default_factory=Managed)


@dataclasses.dataclass(eq=False)
class ManagedFaceModels(FaceModels):
    """The Face Models Loader's output inside ComfyUI: the face models (computing on `device`,
    kept in RAM between runs) and ComfyUI's handle on their torch parts."""

    managed: Managed = dataclasses.field(default_factory=Managed)

    @property
    def torch_parts(self) -> torch.nn.Module:
        return self.managed.parts


def managed(model: ConsisIDModel) -> ConsisIDModel:
    """The Model Loader's output: inside ComfyUI a `ManagedModel`, outside the model itself."""
    if not IN_COMFYUI:
        return model
    return ManagedModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(ConsisIDModel)})


def with_lora(model: ConsisIDModel, lora: LoRA, strength: float) -> ConsisIDModel:
    """`model` with `lora` stacked at `strength` (`lora.with_loras`: outside ComfyUI the sampler
    merges it for its run). Inside ComfyUI it also becomes ComfyUI weight patches (read by its own
    `comfy.lora.load_lora`) on a clone of the transformer's ModelPatcher, as its LoraLoader does."""
    stacked = with_loras(model, [(lora, strength)])
    handles = owner(model)
    if handles is None or not fence.works("lora_patches"):
        return stacked
    weights, keys = {}, {}
    for name, layer in lora.layers.items():
        alpha = torch.tensor(layer.scale * layer.rank, dtype=torch.float64)  # ComfyUI scales by alpha / rank
        weights |= {f"{name}.lora_A.weight": layer.down, f"{name}.lora_B.weight": layer.up, f"{name}.alpha": alpha}
        keys[name] = f"module.{name}.weight"  # the patcher holds the transformer as `Held.module`
    patches = comfy.lora.load_lora(weights, keys)
    return dataclasses.replace(stacked, managed=handles.with_patches(model.transformer, patches, strength))


def managed_faces(models: FaceModels, device: torch.device) -> FaceModels:
    """The Face Models Loader's output: inside ComfyUI the models (loaded in RAM) with ComfyUI's
    handle on their torch parts, to compute on `device`; outside, the models as loaded."""
    if not IN_COMFYUI:
        return models
    fields = {f.name: getattr(models, f.name) for f in dataclasses.fields(FaceModels)} | {"device": device}
    faces = ManagedFaceModels(**fields)
    faces.managed.parts = torch.nn.ModuleDict({"retinaface": models.retinaface, "parser": models.parser, "eva": models.eva})
    return faces


def load(parts: list[tuple[str, torch.nn.Module]], owner: Managed | None, memory_required: int = 0,
         load_device: torch.device | None = None) -> tuple[torch.device, bool]:
    """Before a node's work: ask ComfyUI to load `parts` (evicting other models as needed, with
    `memory_required` bytes left for the work). Returns the device to compute on and whether the
    core should move the models itself (outside ComfyUI, for a part ComfyUI does not hold, or
    where ComfyUI's model management is not as the pack expects)."""
    if owner is None or not fence.works("model_management"):
        return (load_device or torch_device()), True
    patchers = [owner.patcher(part, module, load_device) for part, module in parts]
    model_management.load_models_gpu(patchers, memory_required=memory_required)
    return patchers[0].load_device, False


def owner(model) -> Managed | None:
    """ComfyUI's handles on a model from our loader (None outside ComfyUI)."""
    return getattr(model, "managed", None)


def unload(owner: Managed | None, module: torch.nn.Module) -> None:
    """Take `module` out of ComfyUI's loaded models (back to its offload device), before the core
    streams it layer by layer itself. ComfyUI has no call to unload one model: this does what
    its `free_memory` does for each model it unloads, and where that is not as expected (`fence`:
    unload_one), unloads every model on that device instead."""
    patcher = owner.held(module) if owner is not None and fence.works("model_management") else None
    if patcher is None:
        return
    if not fence.works("unload_one"):
        model_management.free_memory(1e30, patcher.load_device)
        return
    loaded_models = model_management.current_loaded_models
    for loaded in [m for m in loaded_models if patcher.is_clone(m.model)]:  # a LoRA's clone too
        loaded.model_unload()
        loaded_models.remove(loaded)


def merges_loras_itself() -> bool:
    """Whether ComfyUI patches our LoRAs into the transformer it loads (`with_lora`); if not, the
    sampler merges them for its run."""
    return fence.works("lora_patches")


def after_run() -> None:
    """Give freed GPU memory back (after a run or an error)."""
    if fence.works("model_management"):
        model_management.soft_empty_cache()
