"""The nodes' side of ComfyUI: model folders, devices, memory, progress and Cancel.

Inside ComfyUI our models are ComfyUI's to hold (ModelPatchers loaded with `load_models_gpu`, partly
when they do not fit); ComfyUI's internals are reached through `fence`. Outside ComfyUI every
function falls back to plain behaviour, so the nodes run in tests and scripts. How and why:
docs/dev/architecture.md, "Models inside ComfyUI"."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..consisid_core.checkpoint import ANTELOPE_DIR, FACE_ENCODER, ConsisIDModel
from ..consisid_core.errors import ConsisIDError
from ..consisid_core.face.models import FaceModels
from ..consisid_core.files import inside, numbered_path, shown
from ..consisid_core.lora import LoRA, with_loras
from ..consisid_core.memory import home_device
from . import fence
from .fence import IN_COMFYUI, comfy, folder_paths, model_management

logger = logging.getLogger(__name__)

CONSISID_FOLDER = "consisid"
"""Our model folder: `models/consisid/<checkpoint>/` (diffusers layout, face_encoder/ inside)."""


def register_folders() -> None:
    """Check this ComfyUI's internals (`fence`: one log line each that differs) and add
    `models/consisid` to its model folders (called once, by the pack's __init__)."""
    if not fence.works("folders"):
        return
    folder_paths.add_model_folder_path(CONSISID_FOLDER, os.path.join(folder_paths.models_dir, CONSISID_FOLDER))


def _home() -> Path:
    return Path(os.environ.get("CONSISID_HOME", "."))


def folders(kind: str) -> list[Path]:
    """The folders of one model kind: consisid, diffusers, diffusion_models, vae."""
    if IN_COMFYUI:
        fence.require("folders", "the model folders")
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    return [_home() / "models" / kind]


def files(kind: str, suffixes: Iterable[str] = (".safetensors",)) -> list[str]:
    """Weight files of a kind, as names relative to their folder (ComfyUI's list, if there)."""
    suffixes = tuple(suffixes)
    if IN_COMFYUI:
        fence.require("folders", "the model folders")
        try:
            names = folder_paths.get_filename_list(kind)
        except KeyError:
            return []
    else:
        names = sorted(
            str(p.relative_to(root)) for root in folders(kind) if root.is_dir() for p in root.rglob("*") if p.is_file()
        )
    return [n for n in names if n.endswith(suffixes)]


def file_path(kind: str, name: str) -> Path:
    """The full path of a file named relative to a model folder (never outside it); a missing one
    gets an error naming the folder kind."""
    for root in folders(kind):
        path = inside(root, name, f"models/{kind}", follow_links=True)
        if path.is_file():
            return path
    raise FileNotFoundError(f"'{shown(name)}' is not in the {kind} model folders; put it there and refresh the list")


def pipeline_folders() -> dict[str, Path]:
    """ConsisID checkpoint folders by display name: `models/consisid/X` as `X`, and the
    `models/diffusers/X` whose model_index.json names ConsisIDPipeline as `diffusers/X`."""
    found: dict[str, Path] = {}
    for kind, prefix in ((CONSISID_FOLDER, ""), ("diffusers", "diffusers/")):
        for root in folders(kind):
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if (p / "model_index.json").is_file()):
                if kind == "diffusers" and not _names_consisid(folder / "model_index.json"):
                    continue
                found.setdefault(prefix + folder.name, folder)
    return found


def face_encoder_folders() -> dict[str, Path]:
    """Folders holding the face models: each checkpoint's face_encoder/, and standalone ones in
    `models/consisid/` (a folder with models/antelopev2/ inside)."""
    found = {name: path / FACE_ENCODER for name, path in pipeline_folders().items() if (path / FACE_ENCODER).is_dir()}
    for root in folders(CONSISID_FOLDER):
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if (p / ANTELOPE_DIR).is_dir()):
                found.setdefault(folder.name, folder)
    return found


def _names_consisid(index: Path) -> bool:
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "ConsisIDPipeline"
    except (OSError, ValueError):
        return False


def input_dir() -> Path:
    if IN_COMFYUI:
        fence.require("folders", "the input folder")
        return Path(folder_paths.get_input_directory())
    return _home() / "input"


def output_dir() -> Path:
    if IN_COMFYUI:
        fence.require("folders", "the output folder")
        return Path(folder_paths.get_output_directory())
    return _home() / "output"


def input_file(name: str) -> Path:
    """A file named relative to the input folder, refused if the name leads outside it."""
    return inside(input_dir(), name, "input")


def input_files(suffix: str) -> list[str]:
    """Files with `suffix` in the input folder (and its subfolders), as names relative to it."""
    root = input_dir()
    if not root.is_dir():
        return []
    names = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob(f"*{suffix}") if p.is_file())
    return [n for n in names if _stays_inside(root, n)]


def _stays_inside(root: Path, name: str) -> bool:
    try:
        inside(root, name, "input")
    except ValueError:
        return False
    return True


def save_path_checked(prefix: str) -> Path:
    """The output folder, once `prefix` is known to stay inside it (ComfyUI's %date% fields too)
    and to end in a file name."""
    out = output_dir()
    if inside(out, prefix.replace("%", ""), "output") == out:  # '.' or './': the folder itself
        raise ConsisIDError(
            f"filename_prefix '{shown(prefix)}' names the output folder, not a file: end it with a name, "
            "e.g. consisid/identity"
        )
    return out


def save_path(prefix: str, extension: str) -> Path:
    """A new file `<prefix>_<n:05>_<extension>` in the output folder, n one above the highest taken
    (ComfyUI's naming); a prefix that leads outside the output folder is refused."""
    out = save_path_checked(prefix)
    if IN_COMFYUI:
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(out))
        return Path(folder) / f"{name}_{counter:05}_{extension}"
    target = inside(out, prefix, "output")
    target.parent.mkdir(parents=True, exist_ok=True)
    return numbered_path(target.parent, target.name, extension)


def torch_device() -> torch.device:
    if fence.works("model_management"):
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Our models in ComfyUI's model management


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


class ConsisIDFaceModules(Held):
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
    return _held(patcher_class, ConsisIDFaceModules(module), model.load_device, model.offload_device, castable)


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


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    if fence.works("cancel"):
        model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (each update is also a Cancel point), with a latent preview when
    ComfyUI's `--preview-method` is not `none`, as its own samplers; nothing outside ComfyUI."""

    def __init__(self, total: int):
        self._bar = comfy.utils.ProgressBar(total) if fence.works("progress") else None
        self._previews = fence.works("previews") and comfy.cli_args.args.preview_method != (
            comfy.cli_args.LatentPreviewMethod.NoPreviews
        )
        self.total = total

    def update(self, value: int, latents: torch.Tensor | None = None) -> None:
        check_interrupted()
        if self._bar is not None:
            preview = _preview(latents, comfy.cli_args.args.preview_size) if self._previews and latents is not None else None
            self._bar.update_absolute(value, self.total, preview)


def _preview(latents: torch.Tensor, size: int) -> tuple:
    """A cheap look at the first latent frame of [B, F, C, h, w] latents: three channels stretched
    to 0..255, 8x up (the VAE's spatial factor); ComfyUI shrinks it to `size` on the long side."""
    from PIL import Image

    frame = latents[0, 0, :3].float()
    low, high = frame.amin(dim=(1, 2), keepdim=True), frame.amax(dim=(1, 2), keepdim=True)
    pixels = ((frame - low) / (high - low + 1e-6) * 255).byte().permute(1, 2, 0).cpu().numpy()
    return "JPEG", Image.fromarray(pixels).resize((pixels.shape[1] * 8, pixels.shape[0] * 8)), size
