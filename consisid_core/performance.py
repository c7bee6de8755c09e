"""Speed and memory options for one run (`Performance`), applied as diffusers hooks and removed
after the run; always on, with the same results, the Local Facial Extractor runs once per run.
What each option does: docs/dev/architecture.md, "Per-run options".
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import diffusers_hooks as hooks
from .errors import ConsisIDError
from .memory import home_device, kept_home

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("model", "sequential")
ATTENTION_BACKENDS = ("sdpa", "sage")

TEACACHE_COEFFICIENTS = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)
"""TeaCache4ConsisID's polynomial rescaling of the timestep embedding's relative L1 change."""

@dataclass(frozen=True)
class Performance:
    compile: bool = False
    offload: str = "model"
    step_cache: float = 0.0
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ConsisIDError(f"offload '{self.offload}' is not one of {', '.join(OFFLOAD_MODES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConsisIDError(f"attention '{self.attention}' is not one of {', '.join(ATTENTION_BACKENDS)}")
        if not 0 <= self.step_cache < 10:
            raise ConsisIDError(f"step cache threshold {self.step_cache} must be 0 (off) or a small positive number such as 0.1")


@dataclass
class StepCacheStats:
    """What the step cache did in a run: transformer forwards computed and skipped."""

    computed: int = 0
    skipped: int = 0


def _once_per_run_hook():
    class OncePerRun(hooks.hook_base()):
        """The first output, returned again for every later call in this run."""

        def __init__(self):
            super().__init__()
            self.output = None

        def new_forward(self, module, *args, **kwargs):
            if self.output is None:
                self.output = hooks.original_forward(self, *args, **kwargs)
            return self.output

    return OncePerRun()


class TeaCacheState:
    """TeaCache's decision at each step of one run, with ConsisID's coefficients: whether the
    transformer's blocks are skipped and their last computed residual reused. The caller keeps that
    residual in `residual` (None until a step is computed); `decide` is called once per step."""

    def __init__(self, threshold: float, steps: int, stats: StepCacheStats):
        self.threshold, self.steps, self.stats = threshold, steps, stats
        self.rescale = np.poly1d(TEACACHE_COEFFICIENTS)
        self.step = 0
        self.accumulated = 0.0
        self.previous_emb: torch.Tensor | None = None
        self.skip = False
        self.start: tuple[torch.Tensor, torch.Tensor] | None = None
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None

    def decide(self, emb: torch.Tensor) -> None:
        """Called with each step's timestep embedding, before the blocks run."""
        first_or_last = self.step == 0 or self.step == self.steps - 1
        if first_or_last or self.previous_emb is None or self.residual is None:
            self.skip, self.accumulated = False, 0.0
        else:
            change = ((emb - self.previous_emb).abs().mean() / self.previous_emb.abs().mean()).item()
            # past the range the polynomial was fitted on it turns negative: the raw change counts there
            self.accumulated += max(float(self.rescale(change)), change)
            self.skip = self.accumulated < self.threshold
            if not self.skip:
                self.accumulated = 0.0
        self.previous_emb = emb
        self.step += 1
        if self.skip:
            self.stats.skipped += 1
        else:
            self.stats.computed += 1


def _teacache_hooks(transformer: torch.nn.Module, state: TeaCacheState) -> list[tuple[torch.nn.Module, object]]:
    """Hooks that make the transformer skip its blocks (and the face cross-attention between them)
    when `state` says so, reusing the last computed residual: TeaCache without rewriting forward."""
    ModelHook = hooks.hook_base()

    class Decide(ModelHook):  # on time_embedding: its output is this step's embedding
        def post_forward(self, module, output):
            state.decide(output)
            return output

    class FirstBlock(ModelHook):
        def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
            if state.skip:
                return hidden_states + state.residual[0], encoder_hidden_states + state.residual[1]
            state.start = (hidden_states, encoder_hidden_states)
            return hooks.original_forward(self, hidden_states, encoder_hidden_states, *args, **kwargs)

    class LaterBlock(ModelHook):
        def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
            if state.skip:
                return hidden_states, encoder_hidden_states
            return hooks.original_forward(self, hidden_states, encoder_hidden_states, *args, **kwargs)

    class FaceCrossAttention(ModelHook):  # added to the hidden states between blocks
        def new_forward(self, module, face, hidden_states, *args, **kwargs):
            if state.skip:
                return torch.zeros_like(hidden_states)
            return hooks.original_forward(self, face, hidden_states, *args, **kwargs)

    class AfterBlocks(ModelHook):  # on norm_final: its input is cat(text, video) after all blocks
        def pre_forward(self, module, hidden_states, *args, **kwargs):
            if not state.skip:
                text_length = state.start[1].shape[1]
                state.residual = (
                    hidden_states[:, text_length:] - state.start[0],
                    hidden_states[:, :text_length] - state.start[1],
                )
            return (hidden_states, *args), kwargs

    blocks = list(transformer.transformer_blocks)
    pairs = [(transformer.time_embedding, Decide()), (blocks[0], FirstBlock())]
    pairs += [(block, LaterBlock()) for block in blocks[1:]]
    pairs += [(attention, FaceCrossAttention()) for attention in getattr(transformer, "perceiver_cross_attention", [])]
    pairs.append((transformer.norm_final, AfterBlocks()))
    return pairs


SAGE_HEAD_DIMS = (64, 96, 128)
"""Head sizes SageAttention's kernels take (ConsisID's transformer: 64)."""


def sage_kernel(device: torch.device, dtype: torch.dtype, head_dim: int):
    """SageAttention's `sageattn`, once the run's device, dtype and head size are known to suit it."""
    try:
        from sageattention import sageattn
    except ImportError as error:
        raise ConsisIDError(
            "attention 'sage' needs SageAttention: pip install sageattention (CUDA GPUs only), or choose sdpa"
        ) from error
    if device.type != "cuda":
        raise ConsisIDError(f"attention 'sage' runs on CUDA GPUs only, not on {device}: choose sdpa")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConsisIDError(f"attention 'sage' needs a bf16 or fp16 model, this one is {dtype}: load it as bf16, or choose sdpa")
    if head_dim not in SAGE_HEAD_DIMS:
        raise ConsisIDError(
            f"attention 'sage' takes heads of size {', '.join(map(str, SAGE_HEAD_DIMS))}; this transformer's are "
            f"{head_dim}: choose sdpa"
        )
    return sageattn


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each block's compiled call, kept for later runs so that they do not trace again."""


def check_options(transformer: torch.nn.Module, options: Performance) -> None:
    """Refuse, before any work, an option whose diffusers or torch internals differ here."""
    for enabled, needs, option in (
        (options.step_cache > 0, ("registry", "blocks", "face"), "the step cache"),
        (options.attention == "sage", ("registry", "attention"), "attention 'sage'"),
        (options.offload == "sequential", ("offload",), "sequential offload"),
        (options.compile, ("compile",), "compile"),
    ):
        if enabled:
            hooks.check(transformer, needs, option)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


@contextlib.contextmanager
def _offloaded(model, mode: str, device: torch.device | None) -> Iterator[list[torch.nn.Module]]:
    """Yields the modules the caller places on `device` for the run; `sequential` streams the
    transformer's layers there itself, and is undone after the run."""
    if mode == "model" or device is None:
        yield [model.transformer, model.vae]
        return
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    with kept_home(model.transformer) as home:
        try:
            apply_group_offloading(
                model.transformer, onload_device=device, offload_device=home, offload_type="leaf_level",
                use_stream=device.type == "cuda",
            )
            yield [model.vae]
        finally:
            hooks.remove_group_offloading(model.transformer)


@contextlib.contextmanager
def applied(
    model, options: Performance, steps: int, device, stats: StepCacheStats | None = None
) -> Iterator[list[torch.nn.Module]]:
    """Apply `options` (and the always-on identity-token cache) to `model` for one run.

    Yields the modules to place on the device for the run; the step cache counts into `stats`.
    `check_options` has refused what this diffusers cannot do (`sampling.sample` calls it before
    any work).
    """
    stats = stats if stats is not None else StepCacheStats()
    transformer = model.transformer
    pairs = []
    if getattr(transformer, "local_facial_extractor", None) is not None:
        found = hooks.problems(transformer, ("registry", "face"))
        if found:  # diffusers' own forward: the LFE runs every step, the frames are the same
            _warn_once(f"the identity tokens are computed every step: this diffusers ({hooks.diffusers_version()}) "
                       f"differs from what the once-per-run cache is built on ({'; '.join(found)})")
        else:
            pairs.append((transformer.local_facial_extractor, _once_per_run_hook()))
    if options.step_cache > 0:
        pairs += _teacache_hooks(transformer, TeaCacheState(options.step_cache, steps, stats))
    if options.attention == "sage":
        target = torch.device(device) if device is not None else home_device(transformer)
        kernel = sage_kernel(target, model.dtype, transformer.config.attention_head_dim)
        pairs += hooks.attention_hooks(transformer, kernel)
    with _offloaded(model, options.offload, device) as to_place, hooks.hooked(pairs), hooks.compiled(
        list(transformer.transformer_blocks), _COMPILED, options.compile
    ):
        yield to_place
    if options.step_cache > 0:
        logger.info("step cache: %d transformer forwards computed, %d skipped", stats.computed, stats.skipped)
