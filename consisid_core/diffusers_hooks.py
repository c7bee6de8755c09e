"""The one module for the diffusers (and torch) internals the per-run options stand on.

`performance` applies each option as hooks for one run. What it relies on, beyond diffusers'
public API, sits here and is checked where it is used (`check`):

- `diffusers.hooks.HookRegistry`: `check_if_exists_or_initialize(module)`, `register_hook(hook,
  name)`, `remove_hook(name, recurse)`, and the registry kept at `module._diffusers_hook`;
- `diffusers.hooks.ModelHook`: `new_forward`, `pre_forward`, `post_forward`, and the
  `fn_ref.original_forward` a registry sets on a hook it registers;
- group offloading's hook names (`_GROUP_OFFLOADING`, `_LAYER_EXECUTION_TRACKER`,
  `_LAZY_PREFETCH_GROUP_OFFLOADING` in `diffusers.hooks.group_offloading`), to take it off again;
- the ConsisID transformer's parts and call signatures that the hooks wrap: `time_embedding`,
  `transformer_blocks` (`forward(hidden_states, encoder_hidden_states, …)` returning both),
  `perceiver_cross_attention` (`forward(image_embeds, hidden_states)`), `norm_final`,
  `local_facial_extractor`, each block's `attn1`;
- torch's `nn.Module._compiled_call_impl` (what `nn.Module.compile` sets).

If a diffusers release changes any of these, an option that needs it is refused with one line
naming the diffusers version and the option to turn off (`HookApiError`), and the always-on
identity-token cache falls back to diffusers' own forward (the same frames, a little slower)
with one warning: an upgrade can never silently change a frame.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch

from .errors import ConsisIDError

logger = logging.getLogger(__name__)

NAME = "consisid_run"
"""The name our per-run hooks are registered under."""

_GROUP_OFFLOADING_NAMES = ("_GROUP_OFFLOADING", "_LAYER_EXECUTION_TRACKER", "_LAZY_PREFETCH_GROUP_OFFLOADING")

_SIGNATURES = {
    # part of the transformer -> the leading forward parameters the hooks pass on by position
    "transformer_blocks": ("hidden_states", "encoder_hidden_states"),
    "perceiver_cross_attention": ("image_embeds", "hidden_states"),
}


class HookApiError(ConsisIDError):
    """diffusers (or torch) no longer has an internal an option is built on."""


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _hook_classes():
    from diffusers.hooks import HookRegistry, ModelHook

    return HookRegistry, ModelHook


def problems(transformer: torch.nn.Module, needs: tuple[str, ...]) -> list[str]:
    """What differs from what the hooks rely on, for the parts in `needs` ("registry", "blocks",
    "face", "attention", "offload", "compile"); empty when all is as expected."""
    found: list[str] = []
    if "registry" in needs:
        found += _registry_problems()
    if "blocks" in needs or "face" in needs:
        for part in ("time_embedding", "transformer_blocks", "norm_final"):
            if getattr(transformer, part, None) is None:
                found.append(f"the transformer's {part}")
        blocks = getattr(transformer, "transformer_blocks", None) or []
        if blocks and not _leading(type(blocks[0]).forward, ("self", *_SIGNATURES["transformer_blocks"])):
            found.append(f"{type(blocks[0]).__name__}.forward({', '.join(_SIGNATURES['transformer_blocks'])}, …)")
        for attention in getattr(transformer, "perceiver_cross_attention", None) or []:
            if not _leading(type(attention).forward, ("self", *_SIGNATURES["perceiver_cross_attention"])):
                found.append(f"{type(attention).__name__}.forward({', '.join(_SIGNATURES['perceiver_cross_attention'])})")
                break
    if "face" in needs and getattr(transformer, "local_facial_extractor", None) is None:
        found.append("the transformer's local_facial_extractor")
    if "attention" in needs:
        blocks = getattr(transformer, "transformer_blocks", None) or []
        if not blocks or not all(isinstance(getattr(b, "attn1", None), torch.nn.Module) for b in blocks):
            found.append("each transformer block's attn1")
    if "offload" in needs:
        from diffusers.hooks import group_offloading

        missing = [n for n in _GROUP_OFFLOADING_NAMES if not isinstance(getattr(group_offloading, n, None), str)]
        if missing:
            found.append(f"diffusers.hooks.group_offloading.{', '.join(missing)}")
    if "compile" in needs and not all(hasattr(torch.nn.Module, n) for n in ("compile", "_compiled_call_impl", "_call_impl")):
        found.append("torch.nn.Module._compiled_call_impl")
    return found


def _registry_problems() -> list[str]:
    """Try the hook protocol on a throwaway layer: a hook with `new_forward` registered under a
    name is called with the module, reaches the layer's own forward through
    `fn_ref.original_forward`, sits in `module._diffusers_hook`, and is gone after `remove_hook`."""
    try:
        HookRegistry, ModelHook = _hook_classes()
    except ImportError as e:
        return [f"diffusers.hooks has no HookRegistry/ModelHook ({e})"]

    class Probe(ModelHook):
        def new_forward(self, module, x):
            return original_forward(self, x) + 1

    layer = torch.nn.Identity()
    x = torch.zeros(1)
    try:
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(Probe(), NAME)
        hooked_output = layer(x)
        layer._diffusers_hook.remove_hook(NAME, recurse=False)
        plain_output = layer(x)
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        return [f"the hook registry ({type(e).__name__}: {str(e)[:120]})"]
    if not (torch.equal(hooked_output, x + 1) and torch.equal(plain_output, x)):
        return ["the hook registry (a hook's new_forward did not replace the module's forward, or stayed)"]
    return []


def check(transformer: torch.nn.Module, needs: tuple[str, ...], option: str) -> None:
    """Refuse `option` with one line when something in `needs` differs (see `problems`)."""
    found = problems(transformer, needs)
    if found:
        raise HookApiError(
            f"{option} is built on diffusers internals that this diffusers ({diffusers_version()}) does not have as "
            f"expected ({'; '.join(found)}): turn {option} off, or install a diffusers version this pack declares"
        )


def _leading(function, params: tuple[str, ...]) -> bool:
    if function is None:
        return False
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return names[: len(params)] == list(params)


def hook_base():
    """diffusers' `ModelHook`, the base class of our hooks."""
    return _hook_classes()[1]


def original_forward(hook, *args, **kwargs):
    """The hooked module's own forward, called from a hook's `new_forward`."""
    return hook.fn_ref.original_forward(*args, **kwargs)


@contextlib.contextmanager
def hooked(pairs: list[tuple[torch.nn.Module, object]]) -> Iterator[None]:
    """Register each (module, hook) for the block; remove them all after, whatever happens."""
    HookRegistry, _ = _hook_classes()
    registered = []
    try:
        for module, hook in pairs:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, NAME)
            registered.append(module)
        yield
    finally:
        for module in registered:
            module._diffusers_hook.remove_hook(NAME, recurse=False)


def remove_group_offloading(module: torch.nn.Module) -> None:
    """Take off what `diffusers.hooks.apply_group_offloading` put on `module` and its children."""
    from diffusers.hooks import group_offloading

    names = [getattr(group_offloading, n) for n in _GROUP_OFFLOADING_NAMES]
    for child in module.modules():
        registry = getattr(child, "_diffusers_hook", None)
        for name in names:
            if registry is not None and name in registry.hooks:
                registry.remove_hook(name, recurse=False)


@contextlib.contextmanager
def compiled(blocks: list[torch.nn.Module], cache, enabled: bool) -> Iterator[None]:
    """`torch.compile` the blocks for this run (what `nn.Module.compile` does), undone after;
    `cache` (weak, per block) keeps each compiled call for later runs."""
    if not enabled:
        yield
        return
    try:
        for block in blocks:
            if block not in cache:
                cache[block] = torch.compile(block._call_impl)
            block._compiled_call_impl = cache[block]
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None
