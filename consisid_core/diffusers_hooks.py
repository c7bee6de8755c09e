"""The one module for the diffusers (and torch) internals the per-run options stand on: no other
module imports a private diffusers name or writes an undocumented attribute of a diffusers model
(`decoder.py` and `tiling.py` aside; tests/structure/test_private_names.py checks). Each internal is checked
where it is used (`check`); what they are and what happens when one differs:
docs/dev/architecture.md, "The diffusers internals".
"""

from __future__ import annotations

import contextlib
import importlib
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


class _AttentionKernel(torch.overrides.TorchFunctionMode):
    """Inside an attention module's forward, sends its unmasked `scaled_dot_product_attention`
    ([batch, heads, tokens, head size]) to `kernel`; any other call runs as it was."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            call = _sdpa_arguments(*args, **kwargs)
            if (
                call["attn_mask"] is None
                and call["dropout_p"] == 0
                and not call["is_causal"]
                and not call["enable_gqa"]
            ):
                return self.kernel(
                    call["query"], call["key"], call["value"], tensor_layout="HND", is_causal=False, sm_scale=call["scale"]
                )
        return func(*args, **kwargs)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return locals()


def attention_hooks(transformer: torch.nn.Module, kernel) -> list[tuple[torch.nn.Module, object]]:
    """Hooks that run each transformer block's self-attention with `kernel` (see `_AttentionKernel`)."""
    class KernelAttention(hook_base()):
        def __init__(self):
            super().__init__()
            self.mode = _AttentionKernel(kernel)

        def new_forward(self, module, *args, **kwargs):
            with self.mode:
                return original_forward(self, *args, **kwargs)

    return [(block.attn1, KernelAttention()) for block in transformer.transformer_blocks]


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


def fp8_skip_patterns(option: str) -> tuple[str, ...]:
    """diffusers' own patterns of the modules its layerwise casting keeps in their dtype
    (`DEFAULT_SKIP_MODULES_PATTERN` in `diffusers.hooks.layerwise_casting`: embeddings, norms, the
    first and last projections), checked to be a tuple of names."""
    try:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN as patterns
    except ImportError:
        patterns = None
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
        raise HookApiError(
            f"{option} is built on diffusers.hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN, which this "
            f"diffusers ({diffusers_version()}) does not have as expected: load without {option}, or install a "
            "diffusers version this pack declares"
        )
    return patterns


@contextlib.contextmanager
def face_scale(transformer: torch.nn.Module, scale: float | None) -> Iterator[None]:
    """The transformer's identity strength set to `scale` for the block and put back after: the
    `local_face_scale` attribute that diffusers' ConsisID transformer reads in its forward (set
    from its config; nothing documents changing it). None changes nothing."""
    if scale is None:
        yield
        return
    saved = getattr(transformer, "local_face_scale", None)
    if isinstance(saved, bool) or not isinstance(saved, (int, float)):
        raise HookApiError(
            f"identity strength is built on the transformer's local_face_scale, which this diffusers "
            f"({diffusers_version()}) does not have as expected: leave identity strength unset, or install a "
            "diffusers version this pack declares"
        )
    transformer.local_face_scale = scale
    try:
        yield
    finally:
        transformer.local_face_scale = saved


# --- context parallelism (`parallel.py`) -------------------------------------------------------

PARALLEL_DIFFUSERS = (0, 38)
"""The first diffusers release `--parallel`'s sequence modes pass their tests on (0.38 to 0.42
were run; 0.35 has no context parallelism, and 0.37's ring attention takes the log-sum-exp in
another layout)."""


def _release(version: str) -> tuple[int, int]:
    import re

    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    return tuple(numbers + [0] * (2 - len(numbers)))


def context_parallel_api(option: str):
    """What `parallel` uses of diffusers' context parallelism, checked; `HookApiError` naming the
    diffusers version needed where this one lacks any of it:

    - `ContextParallelConfig(ring_degree, ulysses_degree)` with
      `setup(rank, world_size, device, mesh)`, wrapped in `ParallelConfig(context_parallel_config=…)`;
    - `ContextParallelInput(split_dim, expected_dims)` / `ContextParallelOutput(gather_dim, expected_dims)`
      and `apply_context_parallel(module, config, plan)` / `remove_context_parallel(module, plan)`
      (the hooks `ModelMixin.enable_parallelism` registers; called directly so that they come off
      after the run, and because that method divides by the accelerator count, 0 on a CPU);
    - `dispatch_attention_fn(…, backend=, parallel_config=)` and its backends `native` and
      `_native_cudnn` (`native`, `cudnn`), and `_templated_context_parallel_attention(…,
      forward_op=, backward_op=, _parallel_config=)` (Ulysses / ring / both, given a local
      attention that returns its log-sum-exp: `cpu_ring` runs it with torch's CPU flash kernel).
    """
    import types

    needed = ".".join(map(str, PARALLEL_DIFFUSERS))
    refusal = (
        f"{option} needs diffusers >= {needed} (its context parallelism; this is {diffusers_version()}): "
        f"pip install 'diffusers>={needed}', or run without it"
    )
    if _release(diffusers_version()) < PARALLEL_DIFFUSERS:
        raise HookApiError(refusal)
    try:
        from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel
        from diffusers.models import _modeling_parallel as modeling, attention_dispatch
    except ImportError as e:
        raise HookApiError(f"{refusal} ({e})") from e
    found = _context_parallel_problems(modeling, attention_dispatch)
    if found:
        raise HookApiError(f"{refusal}; this one differs in {'; '.join(found)}")
    templated = attention_dispatch._templated_context_parallel_attention

    def cpu_ring(query, key, value, scale, config):
        return templated(
            query, key, value, None, 0.0, False, scale, False, False,
            forward_op=attention_with_lse, backward_op=no_backward, _parallel_config=config,
        )

    names = attention_dispatch.AttentionBackendName
    return types.SimpleNamespace(
        ContextParallelConfig=modeling.ContextParallelConfig, ParallelConfig=modeling.ParallelConfig,
        ContextParallelInput=modeling.ContextParallelInput, ContextParallelOutput=modeling.ContextParallelOutput,
        apply=apply_context_parallel, remove=remove_context_parallel, dispatch=attention_dispatch.dispatch_attention_fn,
        native=names.NATIVE, cudnn=names._NATIVE_CUDNN, cpu_ring=cpu_ring,
    )


def _context_parallel_problems(modeling, attention_dispatch) -> list[str]:
    """What differs in diffusers' context parallelism from what `context_parallel_api` lists."""
    found = []
    missing = [n for n in ("ContextParallelConfig", "ParallelConfig", "ContextParallelInput", "ContextParallelOutput")
               if not isinstance(getattr(modeling, n, None), type)]
    if missing:
        return [f"diffusers.models._modeling_parallel.{', '.join(missing)}"]
    config = modeling.ContextParallelConfig
    missing_fields = {"ring_degree", "ulysses_degree"} - set(getattr(config, "__dataclass_fields__", {}))
    if missing_fields:
        found.append(f"ContextParallelConfig fields {', '.join(sorted(missing_fields))}")
    if not _leading(getattr(config, "setup", None), ("self", "rank", "world_size", "device", "mesh")):
        found.append("ContextParallelConfig.setup(rank, world_size, device, mesh)")
    dispatch = getattr(attention_dispatch, "dispatch_attention_fn", None)
    templated = getattr(attention_dispatch, "_templated_context_parallel_attention", None)
    names = getattr(attention_dispatch, "AttentionBackendName", None)
    if dispatch is None or "parallel_config" not in inspect.signature(dispatch).parameters:
        found.append("dispatch_attention_fn(…, parallel_config=)")
    if templated is None or not {"forward_op", "backward_op", "_parallel_config"} <= set(
        inspect.signature(templated).parameters
    ):
        found.append("_templated_context_parallel_attention(…, forward_op, backward_op, _parallel_config)")
    if names is None or not all(hasattr(names, n) for n in ("NATIVE", "_NATIVE_CUDNN")):
        found.append("AttentionBackendName.NATIVE / _NATIVE_CUDNN")
    return found


def attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """A local attention for diffusers' templated ring attention on the CPU, where none of its own
    backends returns the log-sum-exp: torch's CPU flash kernel (`aten::_scaled_dot_product_flash_
    attention_for_cpu`, what SDPA runs there). [B, S, H, D] in, out [B, S, H, D] (+ lse [B, S, H])."""
    if attn_mask is not None or enable_gqa or dropout_p:
        raise HookApiError("the CPU ring attention takes no mask, dropout or grouped heads")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(x.transpose(1, 2) for x in (query, key, value)), 0.0, is_causal, scale=scale
    )
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def no_backward(ctx, grad_out, *args, **kwargs):
    raise HookApiError("the parallel attention runs inference only")


def cpu_lse_problems() -> list[str]:
    """Whether torch's CPU flash kernel is there and gives SDPA's output and the log-sum-exp."""
    query, key, value = torch.randn(3, 1, 5, 2, 8, generator=torch.Generator().manual_seed(0))
    try:
        out, lse = attention_with_lse(None, query, key, value, return_lse=True)
    except (AttributeError, RuntimeError, TypeError) as e:
        return [f"torch's aten::_scaled_dot_product_flash_attention_for_cpu ({type(e).__name__})"]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    want_lse = torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1).transpose(1, 2)
    if not (torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)):
        return ["torch's aten::_scaled_dot_product_flash_attention_for_cpu (other output or log-sum-exp)"]
    return []


def sdpa_calls(attention: torch.nn.Module, width: int, dtype: torch.dtype) -> int:
    """How many times a ConsisID self-attention (`block.attn1`) calls torch's
    `scaled_dot_product_attention` for one forward on a small random input: the parallel attention
    replaces exactly that call, so anything but 1 means the processor changed."""
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    device = next(attention.parameters()).device
    hidden = torch.zeros(1, 2, width, device=device, dtype=dtype)
    with torch.no_grad(), Count():
        attention(hidden_states=hidden, encoder_hidden_states=hidden)
    return len(calls)


_PARTS = {
    "LocalFacialExtractor": "diffusers.models.transformers.consisid_transformer_3d",
    "PerceiverCrossAttention": "diffusers.models.transformers.consisid_transformer_3d",
    "get_3d_rotary_pos_embed": "diffusers.models.embeddings",
    "get_resize_crop_region_for_grid": "diffusers.pipelines.consisid.pipeline_consisid",
    "VideoProcessor": "diffusers.video_processor",
    "DiagonalGaussianDistribution": "diffusers.models.autoencoders.vae",
}
"""diffusers' inner pieces the native path (`face_layers.py`, `reference.py`) reuses, which diffusers' top level does not
export: the face layers' classes, the reference's rotary embedding and its crop, the frame
preprocessing, the VAE posterior the pipeline samples the first frame from."""


def part(name: str):
    """One of `_PARTS`, from its module; refused in one line when this diffusers has moved it."""
    module = _PARTS[name]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise HookApiError(
            f"the native path uses diffusers' {module}.{name}, which this diffusers ({diffusers_version()}) does not "
            "have: install a diffusers version this pack declares"
        ) from None
