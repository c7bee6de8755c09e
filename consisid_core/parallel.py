"""One video on several GPUs (or CPU processes): sequence and CFG parallelism over torch.distributed.

Launched by `torchrun` (one process, a "rank", per GPU), `sample(..., parallel=Parallel.parse(
"ulysses=2,cfg=2"))` splits each transformer forward over the ranks. How each split works and
what stays whole: docs/dev/architecture.md, "Several processes"; for users: docs/several-gpus.md.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from . import diffusers_hooks as hooks
from .checks import latent_frames
from .tiling import spatial_scale
from .errors import ConsisIDError, RankError, first_line
from .files import join_interruptibly, shown

logger = logging.getLogger(__name__)

MODES = ("ulysses", "ring", "cfg")
MAX_DEGREE = 4096
RENDEZVOUS_SECONDS = 120
"""How long a rank waits for the others to join (torchrun starts them together, within seconds)."""


@dataclass(frozen=True)
class Parallel:
    """How many ranks split each part: the product is the number of processes."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        for mode in MODES:
            value = getattr(self, mode)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEGREE:
                raise ConsisIDError(f"parallel {mode}={value!r} must be a whole number from 1 to {MAX_DEGREE}")
        if self.cfg > 2:
            raise ConsisIDError(f"parallel cfg={self.cfg}: the guided batch has two halves, so cfg is 1 or 2")

    @classmethod
    def parse(cls, text: str) -> Parallel:
        """`"ulysses=2,cfg=2"` (any of ulysses, ring, cfg; unnamed ones are 1)."""
        degrees: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            name, _, value = (x.strip() for x in part.partition("="))
            if name not in MODES or name in degrees or not re.fullmatch("[0-9]+", value):  # not '²', which isdigit
                raise ConsisIDError(
                    f"--parallel '{shown(text)}' is not a split: give MODE=N for each of ulysses, ring, cfg that you "
                    "use, joined by commas (e.g. ulysses=2,cfg=2)"
                )
            if len(value) > len(str(MAX_DEGREE)):  # thousands of digits are more than int() converts
                raise ConsisIDError(f"parallel {name}={shown(value, 20)} must be a whole number from 1 to {MAX_DEGREE}")
            degrees[name] = int(value)
        if not degrees:
            raise ConsisIDError("--parallel is empty: give e.g. ulysses=2, ring=2, cfg=2 or ulysses=2,cfg=2")
        return cls(**degrees)

    @property
    def sequence(self) -> int:
        """Ranks that split the tokens (ulysses × ring)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence * self.cfg

    def __str__(self) -> str:
        return ",".join(f"{m}={getattr(self, m)}" for m in MODES if getattr(self, m) > 1) or "none"


_OUTSIDE_TORCHRUN = (
    "--parallel needs one process per rank, started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, "
    "MASTER_ADDR and MASTER_PORT): torchrun --nproc-per-node N -m consisid_core generate … --parallel … "
    "(N = the product of the degrees)"
)


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) that torchrun gave this process; refused outside torchrun."""
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise ConsisIDError(_OUTSIDE_TORCHRUN) from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise ConsisIDError(_OUTSIDE_TORCHRUN)
    return rank, world_size, local_rank


def meeting_point() -> str:
    """Where the ranks meet, `MASTER_ADDR:MASTER_PORT` (rank 0's address, torchrun sets it); refused
    when it is not given, before torch would fail on it."""
    address, port = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "").strip()
    if not address or not re.fullmatch("[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ConsisIDError(_OUTSIDE_TORCHRUN)
    return f"{shown(address)}:{port}"


def is_writer() -> bool:
    """True on the process that writes results and logs progress: rank 0, or a plain run."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def rank_device(spec: Parallel, device: torch.device, explicit_index: bool) -> torch.device:
    """This rank's device, `cuda:LOCAL_RANK` (or the CPU); refused outside torchrun or when torchrun
    started another number of processes than `spec` splits into."""
    _, _, local_rank = launched()
    meeting_point()
    check_world_size(spec)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConsisIDError(f"--parallel runs on CUDA GPUs or the CPU, not on {device.type}")
    if explicit_index:
        raise ConsisIDError(
            f"--device {device} with --parallel: each rank runs on cuda:LOCAL_RANK; give --device cuda (or auto)"
        )
    if local_rank >= torch.cuda.device_count():
        raise RankError(
            f"local rank {local_rank} has no GPU of its own: torch sees {torch.cuda.device_count()}; start at most "
            "that many processes per machine (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def video_tokens(transformer_config: Mapping, vae_config: Mapping, frames: int, height: int, width: int) -> int:
    """Tokens of one video in the transformer: latent frames × patches per frame."""
    scale = spatial_scale(vae_config) * transformer_config["patch_size"]
    return latent_frames(frames, vae_config["temporal_compression_ratio"]) * (height // scale) * (width // scale)


def check_world_size(spec: Parallel) -> None:
    _, world_size, _ = launched()
    if spec.world_size != world_size:
        raise ConsisIDError(
            f"--parallel {spec} needs {spec.world_size} processes (the product of the degrees), torchrun started "
            f"{world_size}: use --nproc-per-node {spec.world_size} (× --nnodes), or change the split"
        )


def check_parallel(
    spec: Parallel,
    transformer_config: Mapping,
    vae_config: Mapping,
    size: tuple[int, int, int],
    cfg: float,
    performance,
    device: torch.device | str | None,
    dtype: torch.dtype,
    text_tokens: int,
) -> None:
    """Every reason to refuse `spec` for this run, before any work: the same answer on every rank
    (it depends on the arguments, torchrun's environment and the configs only)."""
    check_world_size(spec)
    heads = transformer_config["num_attention_heads"]
    if heads % spec.ulysses:
        fits = [d for d in range(2, heads + 1) if heads % d == 0][:4]
        raise ConsisIDError(
            f"--parallel ulysses={spec.ulysses} does not divide this transformer's {heads} attention heads: choose "
            f"ulysses from {', '.join(map(str, fits)) or '1'}, or ring"
        )
    if spec.cfg > 1 and cfg <= 1:
        raise ConsisIDError(
            f"--parallel cfg={spec.cfg} splits the guided batch, but guidance {cfg} (1 or less) turns "
            "guidance off: drop cfg, or raise the guidance above 1"
        )
    for enabled, option in (
        (performance.step_cache > 0, "the step cache"),
        (performance.offload == "sequential", "sequential offload"),
        (performance.attention != "sdpa", f"attention '{performance.attention}'"),
        (performance.compile, "compile"),
    ):
        if enabled:
            raise ConsisIDError(f"--parallel does not combine with {option} yet: turn {option} off")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConsisIDError(f"--parallel runs on CUDA GPUs or the CPU, not on {device.type}")
    if spec.sequence == 1:
        return
    if spec.ring > 1 and device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        raise ConsisIDError(
            f"--parallel ring={spec.ring} on a GPU needs a bf16 or fp16 model (diffusers' ring attention needs "
            "a kernel that returns the log-sum-exp; cuDNN's takes those): load it as bf16, or use ulysses"
        )
    tokens = video_tokens(transformer_config, vae_config, *size)
    if text_tokens % spec.sequence or tokens % spec.sequence:
        fits = [d for d in range(2, min(text_tokens, tokens) + 1) if not text_tokens % d and not tokens % d][:3]
        raise ConsisIDError(
            f"--parallel {spec}: the {spec.sequence} ranks that split the tokens (ulysses × ring) must share "
            f"{text_tokens} text and {tokens} video tokens equally; ulysses × ring that does: "
            f"{', '.join(map(str, fits)) or 'none (use cfg=2 alone)'}"
        )
    hooks.context_parallel_api("--parallel ulysses/ring")
    if spec.ring > 1 and device.type == "cpu":
        found = hooks.cpu_lse_problems()
        if found:
            raise hooks.HookApiError(
                f"--parallel ring on the CPU is built on torch internals that this torch ({torch.__version__}) "
                f"does not have as expected ({'; '.join(found)}): use ulysses"
            )


def plan(transformer: torch.nn.Module) -> dict:
    """The context-parallel plan for `ConsisIDTransformer3DModel` (diffusers' `_cp_plan` format).

    The text and video tokens are split at the first block and stay split through every block (the
    attention, feed-forward and norms work token by token, or through the parallel attention); the
    face cross-attention after a block takes the rank's video tokens as queries and the identity
    tokens, whole, as keys. Each block gets the whole rotary embeddings and splits them as the video
    tokens. After the last block both streams are gathered, as the final norm runs over
    cat(text, video) and the output is unpatched from all the video tokens.
    """
    api = hooks.context_parallel_api("--parallel ulysses/ring")
    split = api.ContextParallelInput(split_dim=1, expected_dims=3)
    rotary = api.ContextParallelInput(split_dim=0, expected_dims=2)
    gather = api.ContextParallelOutput(gather_dim=1, expected_dims=3)
    last = len(transformer.transformer_blocks) - 1
    return {
        "transformer_blocks.0": {"hidden_states": split, "encoder_hidden_states": split},
        "transformer_blocks.*": {"image_rotary_emb": [rotary, rotary]},
        f"transformer_blocks.{last}": [gather, gather],
    }


def start(device: torch.device) -> bool:
    """Join torchrun's process group, once per process: gloo on the CPU, NCCL for CUDA tensors.
    False when it was joined already."""
    import torch.distributed as dist

    _, world_size, _ = launched()
    if dist.is_initialized():
        return False
    where = meeting_point()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"
    # torch waits for the other ranks inside C++, where no signal handler runs: the wait has a thread
    # of its own (a daemon, left behind if they never come), and this one waits for that thread, a
    # wait that SIGINT and SIGTERM interrupt. (torch's own timeout is the process group's, which
    # bounds every later collective too, so it stays torch's default.)
    failed: list[BaseException] = []

    def join() -> None:
        try:
            dist.init_process_group(backend=backend)
        except Exception as e:  # noqa: BLE001 - torch's store and backends fail in many ways; said in one line
            failed.append(e)

    waiting = threading.Thread(target=join, name="consisid-rendezvous", daemon=True)
    waiting.start()
    join_interruptibly(waiting, RENDEZVOUS_SECONDS)
    fix = f"start them together with torchrun --nproc-per-node {world_size} (× --nnodes), each with the same arguments"
    if waiting.is_alive():
        raise ConsisIDError(
            f"the {world_size} processes of --parallel did not all meet at {where} within {RENDEZVOUS_SECONDS} s: {fix}"
        )
    if failed:
        raise ConsisIDError(f"the processes of --parallel could not meet at {where} ({first_line(failed[0])}): {fix}")
    return True


def finish() -> None:
    """Leave the process group (the command line does at its end)."""
    import torch.distributed as dist

    _MESHES.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(spec: Parallel | None, device: torch.device) -> Iterator[None]:
    """The process group for the block (nothing without `spec`), left after it if the block joined
    it; non-writing ranks log warnings only."""
    if spec is None:
        yield
        return
    joined = start(device)
    quiet = not is_writer()
    package = logging.getLogger("consisid_core")
    level = package.level
    if quiet:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(level)
        if joined:
            finish()


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64)


def from_rank0(spec: Parallel | None, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """`make()` on rank 0 alone, its tensors sent to every rank (the others load nothing for it:
    the T5, the face models). If rank 0 fails, every rank stops: rank 0 with its own error, the
    others with one line pointing to it."""
    if spec is None:
        return make()
    import torch.distributed as dist

    status = torch.zeros(2, dtype=torch.int64)
    tensors: list[torch.Tensor] = []
    header = torch.zeros(0, dtype=torch.int64)
    if dist.get_rank() == 0:
        try:
            tensors = [t.detach().cpu().contiguous() for t in make()]
        except BaseException:
            status[0] = 1
            dist.broadcast(status, 0)
            raise
        header = torch.tensor([v for t in tensors for v in (_DTYPES.index(t.dtype), t.ndim, *t.shape)], dtype=torch.int64)
        status[1] = header.numel()
    dist.broadcast(status, 0)
    if status[0]:
        raise ConsisIDError("rank 0 stopped before sampling (its message says why)")
    header = header if dist.get_rank() == 0 else torch.empty(int(status[1]), dtype=torch.int64)
    dist.broadcast(header, 0)
    if dist.get_rank() != 0:
        values, i = header.tolist(), 0
        while i < len(values):
            dtype, ndim = _DTYPES[values[i]], values[i + 1]
            tensors.append(torch.empty(values[i + 2 : i + 2 + ndim], dtype=dtype))
            i += 2 + ndim
    for tensor in tensors:
        dist.broadcast(tensor, 0)
    return tensors


_MESHES: dict = {}


def _mesh(spec: Parallel, device: torch.device):
    """The (cfg, ring, ulysses) device mesh, made once per process and split."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (spec.cfg, spec.ring, spec.ulysses, device.type)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, key[:3], mesh_dim_names=("cfg", "ring", "ulysses"))
    return _MESHES[key]


def _cfg_hook(group, index: int, size: int):
    """On the transformer: this rank's half of the guided batch in, both halves out."""
    import torch.distributed as dist

    class GuidedBatchSplit(hooks.hook_base()):
        def new_forward(self, module, *args, **kwargs):
            call = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
            values = call.arguments
            for name in ("hidden_states", "encoder_hidden_states", "timestep"):
                value = values[name]
                if value.shape[0] != size:
                    raise ConsisIDError(f"cfg={size} needs a guided batch of {size}, the transformer got {value.shape[0]}")
                values[name] = value.chunk(size)[index]
            output = hooks.original_forward(self, *call.args[1:], **call.kwargs)
            sample = output[0] if isinstance(output, tuple) else output.sample
            parts = [torch.empty_like(sample) for _ in range(size)]
            dist.all_gather(parts, sample.contiguous(), group=group)
            whole = torch.cat(parts)
            return (whole, *output[1:]) if isinstance(output, tuple) else type(output)(sample=whole)

    return GuidedBatchSplit()


def _attention(api, config, spec: Parallel, device: torch.device):
    """The kernel the self-attention's SDPA call goes to ([B, H, S, D] in and out, as SDPA)."""
    if spec.ring == 1:
        backend = api.native  # Ulysses: any local attention; SDPA picks its kernel
    elif device.type == "cuda":
        backend = api.cudnn  # ring: a kernel that returns the log-sum-exp
    else:
        backend = None  # ring on the CPU: diffusers has no backend for it, torch's CPU flash kernel does

    def attention(query, key, value, tensor_layout="HND", is_causal=False, sm_scale=None):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if backend is not None:
            out = api.dispatch(q, k, v, scale=sm_scale, backend=backend, parallel_config=config)
        else:
            out = api.cpu_ring(q, k, v, sm_scale, config)
        return out.transpose(1, 2).to(query.dtype)

    return attention


@contextlib.contextmanager
def split_over_ranks(transformer: torch.nn.Module, spec: Parallel | None, device, dtype: torch.dtype) -> Iterator[None]:
    """Split the transformer's forwards over the ranks as `spec` says, for the block; all undone
    after, whatever happens (the model never keeps it). `dtype`: the model's compute dtype."""
    if spec is None:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    start(device)
    import torch.distributed as dist

    mesh = _mesh(spec, device)
    logger.info("--parallel %s: %d ranks; this is rank %d on %s", spec, dist.get_world_size(), dist.get_rank(), device)
    pairs = []
    if spec.cfg > 1:
        pairs.append((transformer, _cfg_hook(mesh["cfg"].get_group(), mesh["cfg"].get_local_rank(), spec.cfg)))
    with contextlib.ExitStack() as stack:
        if spec.sequence > 1:
            api = hooks.context_parallel_api("--parallel ulysses/ring")
            hooks.check(transformer, ("registry", "attention"), "--parallel ulysses/ring")
            width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            if hooks.sdpa_calls(transformer.transformer_blocks[0].attn1, width, dtype) != 1:
                raise hooks.HookApiError(
                    f"--parallel ulysses/ring replaces the one scaled_dot_product_attention call of ConsisID's "
                    f"self-attention, which this diffusers ({hooks.diffusers_version()}) does not make as expected: "
                    "use cfg alone, or install a diffusers version this pack declares"
                )
            cp = api.ContextParallelConfig(ring_degree=spec.ring, ulysses_degree=spec.ulysses)
            config = api.ParallelConfig(context_parallel_config=cp)
            config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh["ring", "ulysses"])
            pairs += hooks.attention_hooks(transformer, _attention(api, config, spec, device))
            layout = plan(transformer)
            api.apply(transformer, cp, layout)
            stack.callback(api.remove, transformer, layout)
        stack.enter_context(hooks.hooked(pairs))
        yield
