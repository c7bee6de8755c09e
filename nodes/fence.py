"""The one module that names the ComfyUI internals the wrapper nodes rely on, and checks them.

Each is an `Assumption` in `ASSUMPTIONS` (with the native path's, `nodes/native/comfy_parts.py`):
the feature that uses it, a cheap probe, and what happens without it. `check` probes them once when
the pack loads and logs one line per feature that differs; the feature then falls back, or its
option is refused in one line when used (`require`). How and why: docs/dev/architecture.md, "The
fence"."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Callable

import torch

from ..consisid_core.errors import ConsisIDError

try:
    import comfy.cli_args
    import comfy.lora
    import comfy.model_management as model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.utils
    import folder_paths
except ImportError:
    comfy = folder_paths = model_management = None

logger = logging.getLogger(__name__)

IN_COMFYUI = model_management is not None

CASTABLE = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "Embedding")
"""torch layers that ComfyUI's `operations` classes have a castable twin of."""

_NOT_SETTINGS = ("self", "device", "dtype", "_weight", "_freeze")
"""torch layers' constructor arguments that are not settings of the layer."""


class ComfyApiError(ConsisIDError):
    """This ComfyUI lacks an internal an option needs, and the option has no fallback."""


def comfyui_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except (ImportError, AttributeError):
        return "unknown"


def twin(layer: torch.nn.Module, operations) -> torch.nn.Module:
    """`layer` as ComfyUI builds its own layers: the class of the same name in `operations`
    (`comfy.ops.disable_weight_init`, or `manual_cast` for weights stored in another dtype),
    constructed with the layer's settings on the meta device, then given the layer's own
    parameters. What ComfyUI's constructor sets up (`bias` on an Embedding, the cast switches, the
    model dtype dynamic VRAM pages by) is there because its constructor ran. With dynamic VRAM on,
    ComfyUI's constructor reserves no weight: it leaves `weight = None` (and `bias`) as plain
    attributes, which would hide the parameters put in; they are taken off first."""
    name = type(layer).__name__
    settings = {}
    for arg in inspect.signature(getattr(torch.nn, name).__init__).parameters:
        if arg in _NOT_SETTINGS:
            continue
        settings[arg] = getattr(layer, arg) is not None if arg == "bias" else getattr(layer, arg)
    weight = getattr(layer, "weight", None)
    dtype = weight.dtype if weight is not None else torch.get_default_dtype()
    built = getattr(operations, name)(**settings, device="meta", dtype=dtype)
    for key, parameter in layer._parameters.items():
        built.__dict__.pop(key, None)
        built._parameters[key] = parameter
    for key, buffer in layer._buffers.items():
        built.__dict__.pop(key, None)
        built._buffers[key] = buffer
    built.train(layer.training)
    return built


def castable(layer: torch.nn.Module) -> bool:
    """A plain torch layer that has a ComfyUI twin (not a subclass with a forward of its own)."""
    name = type(layer).__name__
    return name in CASTABLE and type(layer) is getattr(torch.nn, name)


# ---------------------------------------------------------------------------------------------
# The probes: each returns what differs (empty when all is as the pack expects)


def _missing(owner, names: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{n}" for n in names if not callable(getattr(owner, n, None))]


def takes(function, *params: str) -> bool:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    accepted = signature.parameters
    variadic = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return all(p in accepted or variadic for p in params)


def _folders() -> list[str]:
    names = ("add_model_folder_path", "get_folder_paths", "get_filename_list", "get_input_directory",
             "get_output_directory", "get_save_image_path")
    found = _missing(folder_paths, names, "folder_paths")
    if not isinstance(getattr(folder_paths, "models_dir", None), str):
        found.append("folder_paths.models_dir")
    return found


def _model_management() -> list[str]:
    patcher = getattr(comfy.model_patcher, "ModelPatcher", None)
    if patcher is None:
        return ["comfy.model_patcher.ModelPatcher"]
    found = _missing(patcher, ("clone", "is_clone", "model_size", "partially_load", "load"), "ModelPatcher")
    if not takes(patcher.__init__, "model", "load_device", "offload_device"):
        found.append("ModelPatcher(model, load_device, offload_device)")
    found += _missing(model_management, ("get_torch_device", "unet_offload_device", "text_encoder_offload_device",
                                         "vae_offload_device", "free_memory", "soft_empty_cache"),
                      "comfy.model_management")
    load = getattr(model_management, "load_models_gpu", None)
    if load is None or not takes(load, "models", "memory_required"):
        found.append("comfy.model_management.load_models_gpu(models, memory_required=)")
    return found


def _probe_layers() -> list[torch.nn.Module]:
    """One of each castable layer kind, small, as our models have them."""
    return [
        torch.nn.Linear(4, 3), torch.nn.Linear(4, 3, bias=False), torch.nn.Conv1d(2, 2, 1), torch.nn.Conv2d(2, 2, 3, padding=1),
        torch.nn.Conv3d(2, 2, 1), torch.nn.GroupNorm(1, 2), torch.nn.LayerNorm(4), torch.nn.LayerNorm(4, elementwise_affine=False),
        torch.nn.Embedding(5, 4),
    ]


def _probe_input(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, torch.nn.Embedding):
        return torch.tensor([[0, 4, 2]])
    shape = {torch.nn.Conv1d: (1, 2, 3), torch.nn.Conv2d: (1, 2, 3, 3), torch.nn.Conv3d: (1, 2, 1, 3, 3),
             torch.nn.GroupNorm: (1, 2, 3)}.get(type(layer), (2, 4))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _twin_problem(layer: torch.nn.Module, operations: str) -> str | None:
    """What differs when `layer` is built from `comfy.ops.<operations>` (None if nothing)."""
    where = f"comfy.ops.{operations}.{type(layer).__name__}"
    try:
        built = twin(layer, getattr(comfy.ops, operations))
        same = torch.equal(built(_probe_input(layer)), layer(_probe_input(layer)))
        built.comfy_cast_weights = True  # as ComfyUI's partial load switches it on
        cast = torch.equal(built(_probe_input(layer)), layer(_probe_input(layer)))
        attributes = all(hasattr(built, a) for a in ("weight", "bias", "weight_function", "bias_function"))
    except Exception as e:  # any way a changed class can fail is a mismatch, said in the log
        return f"{where} ({type(e).__name__}: {str(e)[:80]})"
    return None if same and cast and attributes else f"{where} (not the same layer once built, cast or looked up)"


def _partial_load() -> list[str]:
    found = []
    for operations in ("disable_weight_init", "manual_cast"):
        problem = next(filter(None, (_twin_problem(layer, operations) for layer in _probe_layers())), None)
        if problem:
            found.append(problem)  # the first layer kind that differs says enough
    if not callable(getattr(comfy.model_patcher.ModelPatcher, "add_callback", None)):
        found.append("ModelPatcher.add_callback")
    callbacks = getattr(comfy.patcher_extension, "CallbacksMP", None)
    for name in ("ON_LOAD", "ON_DETACH"):
        if not isinstance(getattr(callbacks, name, None), str):
            found.append(f"comfy.patcher_extension.CallbacksMP.{name}")
    return found


def _dynamic_vram() -> list[str]:
    """Dynamic VRAM as v0.33 has it: `ModelPatcherDynamic`, `CoreModelPatcher` (the patcher class core
    builds its own models' patchers from, the dynamic one when dynamic VRAM is on), `is_dynamic` on
    every patcher. A ComfyUI from before dynamic VRAM (no `ModelPatcherDynamic`) has nothing to take
    part in, which is as expected."""
    patcher = comfy.model_patcher.ModelPatcher
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic is None:
        return []
    core = getattr(comfy.model_patcher, "CoreModelPatcher", None)
    found = [] if isinstance(core, type) and issubclass(core, patcher) else ["comfy.model_patcher.CoreModelPatcher"]
    if not (isinstance(dynamic, type) and issubclass(dynamic, patcher)):
        found.append("comfy.model_patcher.ModelPatcherDynamic")
    return found + _missing(patcher, ("is_dynamic",), "ModelPatcher")


def _lora_patches() -> list[str]:
    found = _missing(comfy.model_patcher.ModelPatcher, ("add_patches", "clone"), "ModelPatcher")
    weights = {"x.lora_A.weight": torch.ones(1, 2), "x.lora_B.weight": torch.ones(2, 1), "x.alpha": torch.tensor(1.0)}
    try:
        patches = comfy.lora.load_lora(weights, {"x": "m.x.weight"}, log_missing=False)
    except Exception as e:  # a changed signature or format, said in the log
        return [*found, f"comfy.lora.load_lora ({type(e).__name__}: {str(e)[:80]})"]
    if list(patches) != ["m.x.weight"]:
        found.append("comfy.lora.load_lora (no patch for a diffusers/PEFT LoRA key)")
    return found


def _unload_one() -> list[str]:
    loaded = getattr(model_management, "current_loaded_models", None)
    found = [] if isinstance(loaded, list) else ["comfy.model_management.current_loaded_models"]
    loaded_model = getattr(model_management, "LoadedModel", None)
    if loaded_model is None or not callable(getattr(loaded_model, "model_unload", None)):
        found.append("comfy.model_management.LoadedModel.model_unload")
    return found


def _progress() -> list[str]:
    bar = getattr(comfy.utils, "ProgressBar", None)
    if bar is None or not takes(getattr(bar, "update_absolute", None), "value", "total", "preview"):
        return ["comfy.utils.ProgressBar.update_absolute(value, total, preview)"]
    return []


def _previews() -> list[str]:
    method = getattr(getattr(comfy.cli_args, "LatentPreviewMethod", None), "NoPreviews", None)
    args = getattr(comfy.cli_args, "args", None)
    if method is None or not all(hasattr(args, a) for a in ("preview_method", "preview_size")):
        return ["comfy.cli_args.args.preview_method/preview_size, LatentPreviewMethod.NoPreviews"]
    return []


def _cancel() -> list[str]:
    return _missing(model_management, ("throw_exception_if_processing_interrupted",), "comfy.model_management")


def _prompt_server():
    """ComfyUI's `server.PromptServer` when a server runs (ComfyUI loads it before any custom node;
    without one, no prompt is queued), else None."""
    return getattr(sys.modules.get("server"), "PromptServer", None)


def _prompt_handlers() -> list[str]:
    server = _prompt_server()
    return [] if server is None else _missing(server, ("add_on_prompt_handler",), "server.PromptServer")


@dataclasses.dataclass(frozen=True)
class Assumption:
    """What one feature of the pack assumes of ComfyUI: `probe` returns what differs (empty when all
    is as expected), `without` says what the pack does then (a fallback, or a one-line refusal
    through `require`). A feature that `needs` another is off whenever that one is."""

    feature: str
    uses: str
    without: str
    probe: Callable[[], list[str]]
    needs: str | None = None
    quiet: bool = False


ASSUMPTIONS = (
    Assumption("folders", "model, input and output folders", "the nodes that list or save files refuse in one line", _folders),
    Assumption("model_management", "ComfyUI holding our models", "each node places our models itself and frees them after",
               _model_management),
    Assumption("partial_load", "loading the transformer and T5 partly when they do not fit",
               "they load whole (or not at all, if they do not fit)", _partial_load, needs="model_management"),
    Assumption("dynamic_vram", "dynamic VRAM", "the pack takes dynamic VRAM as off: the native MODEL's face layers "
               "load in ComfyUI's classic patcher, partly when they do not fit", _dynamic_vram, needs="partial_load"),
    Assumption("lora_patches", "ConsisID LoRA as ComfyUI weight patches", "the sampler merges the LoRAs for its run",
               _lora_patches, needs="model_management"),
    Assumption("unload_one", "taking the transformer out for sequential offload",
               "every model on that device is unloaded instead", _unload_one, needs="model_management"),
    Assumption("progress", "progress bars", "no progress bar (Cancel still works)", _progress),
    Assumption("previews", "latent previews", "no previews", _previews),
    Assumption("cancel", "Cancel during sampling", "Cancel takes effect when the node ends", _cancel),
    Assumption("prompt_handlers", "running prompts made before inputs were renamed",
               "such a prompt fails with ComfyUI's 'Required input is missing' (open the workflow and save it "
               "again)", _prompt_handlers),
)


def assumptions() -> tuple[Assumption, ...]:
    """Every assumption of the pack: the wrapper path's (`ASSUMPTIONS`) and the native path's
    (`nodes/native/comfy_parts.ASSUMPTIONS`), in the order they are checked."""
    from .native import comfy_parts  # imported here: comfy_parts imports this module

    return ASSUMPTIONS + comfy_parts.ASSUMPTIONS


@functools.cache
def check() -> dict[str, list[str]]:
    """Each feature's mismatches with the running ComfyUI (empty when none), found once; one log line
    per feature that differs (not for one that only lacks what it `needs`, nor a `quiet` one).
    Outside ComfyUI: every feature is missing, silently."""
    every = assumptions()
    if not IN_COMFYUI:
        return {a.feature: ["ComfyUI"] for a in every}
    found = {}
    for assumption in every:
        if assumption.needs is not None and found[assumption.needs]:
            found[assumption.feature] = [f"(needs {assumption.needs})"]
            continue
        try:
            found[assumption.feature] = assumption.probe()
        except Exception as e:  # a probe must never stop the pack from loading
            found[assumption.feature] = [f"{type(e).__name__}: {str(e)[:80]}"]
    for assumption in every:
        own = assumption.needs is None or not found[assumption.needs]
        if found[assumption.feature] and own and not assumption.quiet:
            logger.warning(
                "ConsisID: this ComfyUI (%s) differs in what the pack uses for %s (%s): %s", comfyui_version(),
                assumption.uses, ", ".join(found[assumption.feature]), assumption.without,
            )
    return found


def works(feature: str) -> bool:
    """Whether `feature` (an `Assumption.feature`) is as the pack expects in this ComfyUI."""
    return not check()[feature]


def require(feature: str, option: str) -> None:
    """Refuse `option` with one line when `feature` differs in this ComfyUI."""
    if not works(feature):
        raise ComfyApiError(
            f"{option} needs ComfyUI internals that this ComfyUI ({comfyui_version()}) does not have as expected "
            f"({', '.join(check()[feature])}): use a ComfyUI version this pack declares (see its README)"
        )


def on_prompt(handler: Callable[[dict], dict]) -> None:
    """`handler` given each prompt queued to this ComfyUI's server (/prompt's JSON), before ComfyUI
    validates it; nothing without a server."""
    instance = getattr(_prompt_server(), "instance", None)
    if instance is not None and works("prompt_handlers"):
        instance.add_on_prompt_handler(handler)


def t5_pairs(clip, text: str, min_length: int) -> tuple[dict, list[tuple] | None]:
    """A ComfyUI CLIP's tokens for `text` with prompt weights off and at least `min_length` tokens,
    and its T5-XXL (id, weight, …) tuples in order (None for a CLIP without T5-XXL); a CLIP that
    tokenizes otherwise is refused."""
    try:
        tokens = clip.tokenize(text, disable_weights=True, tokenizer_options={"t5xxl_min_length": min_length})
        pairs = [pair for batch in tokens["t5xxl"] for pair in batch] if "t5xxl" in tokens else None
        well_formed = pairs is None or all(isinstance(p, tuple) and len(p) >= 2 and int(p[0]) == p[0] for p in pairs)
    except (TypeError, AttributeError, ValueError) as e:
        raise ComfyApiError(
            f"this ComfyUI's ({comfyui_version()}) CLIP tokenizes otherwise than the pack expects ({type(e).__name__}): "
            "connect the ConsisID model to Text Encode to use the checkpoint's own T5"
        ) from None
    if not well_formed:
        raise ComfyApiError(
            f"this ComfyUI's ({comfyui_version()}) T5 tokens are not (id, weight) pairs: connect the ConsisID model "
            "to Text Encode to use the checkpoint's own T5"
        )
    return tokens, pairs
