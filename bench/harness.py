"""Our path against `diffusers.ConsisIDPipeline`: same files, same inputs, same process, alternating.

One run of a path is: load (a fresh `Checkpoint.load_model` or `ConsisIDPipeline.from_pretrained`),
sample, decode, release. Each phase is timed and its peak memory taken: on the CPU the peak of the
process's resident set (VmRSS, polled every 5 ms in a thread) minus its value when the phase began;
on a GPU `torch.cuda.max_memory_allocated` after a reset at the phase start. Repeats alternate which
path goes first; the table shows medians.

- seconds per step: (time of the last step's callback − time of the first's) / (steps − 1), so
  step 1 is left out: it carries the first frame's VAE encode and warm-up ("setup + step 1").
- diffusers runs as its users call it, one `pipe(...)` with `output_type="pt"`: its decode is the
  time from the last step's callback to the return (`decode_latents` + `postprocess_video`).
- ours is `sample(...)` then `decode(...)`; end-to-end is the two together, load not included.
- with prompts (`--text t5`) ours encodes them first, as the CLI does (`encode_with_checkpoint`:
  load the checkpoint's T5, encode, release), then loads the model; diffusers gets `prompt=` and
  encodes inside `pipe(...)` with the T5 its `from_pretrained` loaded. Its encode is timed by
  wrapping the pipeline's `encode_prompt` (timing only). End-to-end then includes the encode.
- the whole run's peak (load + encode + sample + decode) is taken too, above the memory held just
  before the run (after `gc.collect()` and `malloc_trim(0)`, so the previous run's freed memory is
  back with the OS): on the CPU peak VmRSS and peak RssAnon (anonymous memory only), on a GPU
  `max_memory_allocated`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consisid_core.checkpoint import Checkpoint
from consisid_core.performance import Performance, StepCacheStats
from consisid_core.decoder import Tiling
from consisid_core.sampling import decode, sample
from consisid_core.text import MAX_SEQUENCE_LENGTH, TextEmbeddings, encode_with_checkpoint
from consisid_core.tiny import random_identity


logger = logging.getLogger(__name__)

SEED = 42
GUIDANCE = 6.0
PROMPT = (
    "The video features a woman standing next to an airplane, engaged in a conversation on her cell phone. "
    "She is wearing sunglasses and a black top, and she appears to be talking seriously."
)
NEGATIVE_PROMPT = "blurry, low quality, distorted face"


# ---------------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    kind: str  # "default", "decode" (re-decode the default latents), "sample" (a whole run)
    ours: dict = field(default_factory=dict)  # Performance fields for the run
    ours_load: dict = field(default_factory=dict)  # Checkpoint.load_model options
    diffusers: str | None = None  # how diffusers does the same, None when it has no counterpart
    gpu_only: bool = False


DEFAULT = Mode("default", "default", "default")
MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("tiling", "VAE tiling", "decode", diffusers="vae.enable_tiling"),
        Mode("slicing", "VAE slicing", "decode", diffusers="vae.enable_slicing"),
        Mode("offload-model", "model CPU offload", "sample", {"offload": "model"},
             diffusers="enable_model_cpu_offload", gpu_only=True),
        Mode("offload-sequential", "sequential CPU offload", "sample", {"offload": "sequential"},
             diffusers="enable_sequential_cpu_offload", gpu_only=True),
        Mode("fp8", "fp8 weights", "sample", {}, {"fp8": True},
             diffusers="transformer.enable_layerwise_casting(float8_e4m3fn)"),
        Mode("compile", "torch.compile", "sample", {"compile": True}, diffusers="torch.compile(transformer)",
             gpu_only=True),
        Mode("sage", "SageAttention", "sample", {"attention": "sage"}, diffusers=None, gpu_only=True),
        *(
            Mode(f"cache-{t}", f"step cache {t}", "sample", {"step_cache": t})
            for t in (0.1, 0.15, 0.2)
        ),
    )
}
"""Every mode the bench knows. On the CPU, `gpu_only` modes run only when asked for by name."""


def default_modes(device: torch.device) -> list[str]:
    return [m.name for m in MODES.values() if device.type == "cuda" or not m.gpu_only]


# ---------------------------------------------------------------------------------------------
# Measuring


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so a phase's RSS growth is not hidden by
    memory an earlier phase freed but the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    return _rss_and_anon_bytes()[0]


def _rss_and_anon_bytes() -> tuple[int, int]:
    """(VmRSS, RssAnon): the resident set, and its anonymous part (file-backed pages such as
    memory-mapped weights left out: those the kernel can drop and read back)."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


class PeakMemory:
    """Peak memory per phase: RSS above the phase's start on the CPU, max allocated on a GPU; and
    the same over a whole run (several phases), above the run's start (`begin_run`)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.cuda = device.type == "cuda"
        self.rss = os.path.exists("/proc/self/status")
        self.interval = interval
        self._base = self._peak = 0
        self._run_base = self._run_peak = (0, 0)  # (VmRSS, RssAnon) on the CPU; (allocated, 0) on a GPU
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.rss and not self.cuda:
            self._thread = threading.Thread(target=self._poll, name="bench-rss", daemon=True)
            self._thread.start()

    @property
    def label(self) -> str:
        if self.cuda:
            return "peak GPU MB (max allocated)"
        return "peak RSS MB (above phase start)" if self.rss else "peak memory (unavailable)"

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> int:
        rss, anon = _rss_and_anon_bytes()
        with self._lock:
            self._peak = max(self._peak, rss)
            self._run_peak = (max(self._run_peak[0], rss), max(self._run_peak[1], anon))
        return rss

    def _fold_gpu_peak(self) -> None:
        """The GPU's peak since the last reset into the run's, before a phase resets it."""
        peak = torch.cuda.max_memory_allocated(self.device)
        self._run_peak = (max(self._run_peak[0], peak), 0)

    def begin_run(self) -> None:
        """A run begins here: its baseline is taken after `gc.collect()` and `malloc_trim(0)`."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._run_base = self._run_peak = (torch.cuda.memory_allocated(self.device), 0)
        elif self.rss:
            _trim_heap()
            with self._lock:
                self._run_base = self._run_peak = _rss_and_anon_bytes()

    def run_peak_mb(self) -> tuple[float, float]:
        """The run's peak so far above its start, MiB: (VmRSS, RssAnon) on the CPU, (allocated, nan) on a GPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._fold_gpu_peak()
            return (self._run_peak[0] - self._run_base[0]) / 2**20, float("nan")
        if not self.rss:
            return float("nan"), float("nan")
        self._sample()
        with self._lock:
            return tuple((p - b) / 2**20 for p, b in zip(self._run_peak, self._run_base))

    def reset(self) -> None:
        """A phase begins here."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._fold_gpu_peak()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.rss:
            _trim_heap()
            value = _rss_bytes()
            with self._lock:
                self._base = self._peak = value

    def held_mb(self) -> float:
        """What the phase holds now: RSS above its start on the CPU, allocated on a GPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        if not self.rss:
            return float("nan")
        gc.collect()
        _trim_heap()
        return (_rss_bytes() - self._base) / 2**20

    def peak_mb(self) -> float:
        """Peak of the phase so far, in MiB."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.rss:
            return float("nan")
        self._sample()
        with self._lock:
            return (self._peak - self._base) / 2**20

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class RunResult:
    encode_s: float = float("nan")  # with prompts: ours' encode_with_checkpoint, diffusers' encode_prompt
    encode_mb: float = float("nan")
    run_mb: float = float("nan")  # the whole run's peak above its start (RSS, or GPU allocated)
    run_anon_mb: float = float("nan")  # the same for RssAnon (CPU only)
    load_s: float = float("nan")
    load_mb: float = float("nan")
    held_mb: float = float("nan")  # still held when the load returned: the resident weights
    setup_s: float = float("nan")  # call start to the end of step 1
    step_s: float = float("nan")
    sample_s: float = float("nan")
    sample_mb: float = float("nan")
    decode_s: float = float("nan")
    decode_mb: float = float("nan")
    latents: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    error: str = ""
    cache_counts: tuple[int, int] | None = None  # step cache: transformer forwards (computed, skipped)

    @property
    def total_s(self) -> float:
        """Sampling + decode, and the text encode when there was one."""
        return self.sample_s + self.decode_s + (self.encode_s if self.encode_s == self.encode_s else 0.0)


class _Steps:
    """Step-end timestamps (synchronised on a GPU); optionally a phase switch at the last step."""

    def __init__(self, device: torch.device, steps: int, memory: PeakMemory, result: RunResult):
        self.device, self.steps, self.memory, self.result = device, steps, memory, result
        self.times: list[float] = []
        self.start = 0.0

    def begin(self) -> None:
        self.memory.reset()
        self.start = time.perf_counter()

    def __call__(self, done: int, latents: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now)
        if done == self.steps:
            r = self.result
            r.sample_s = now - self.start
            r.sample_mb = self.memory.peak_mb()
            r.setup_s = self.times[0] - self.start
            r.step_s = (now - self.times[0]) / (len(self.times) - 1) if len(self.times) > 1 else r.setup_s
            r.latents = latents.detach().to("cpu", copy=True)
            self.memory.reset()
            self.decode_start = time.perf_counter()


# ---------------------------------------------------------------------------------------------
# The two paths


@dataclass
class Inputs:
    identity: object
    text: TextEmbeddings | None  # precomputed embeddings, or None: each path encodes `prompt`
    frames: int
    height: int
    width: int
    steps: int
    prompt: str | None = None
    negative_prompt: str = ""


def make_inputs(checkpoint: Path, steps: int, frames: int, height: int, width: int,
                text: str = "embeddings") -> Inputs:
    """`text` "embeddings": the same random text embeddings for both paths; "t5": the prompt
    strings PROMPT and NEGATIVE_PROMPT, which each path encodes with the checkpoint's T5."""
    config = Checkpoint.open(checkpoint).transformer_config
    identity = random_identity(config, seed=11, face_size=64)
    if text == "t5":
        return Inputs(identity, None, frames, height, width, steps, PROMPT, NEGATIVE_PROMPT)
    g = torch.Generator("cpu").manual_seed(3)
    shape = (1, MAX_SEQUENCE_LENGTH, config["text_embed_dim"])
    # T5-XXL's outputs are small (its final RMSNorm): this scale keeps the random ones alike
    embeddings = TextEmbeddings(0.1 * torch.randn(shape, generator=g), 0.1 * torch.randn(shape, generator=g))
    return Inputs(identity, embeddings, frames, height, width, steps)


class Ours:
    name = "ours"
    encodes_before_load = True  # as the CLI: encode_with_checkpoint, then load_model

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.model = self.vae = None
        self.text: TextEmbeddings | None = None

    def encode(self, inputs: Inputs) -> None:
        """The checkpoint's T5, loaded for the prompts and released (`encode_with_checkpoint`)."""
        device = None if self.device.type == "cpu" else self.device
        self.text = encode_with_checkpoint(
            Checkpoint.open(self.checkpoint), self.dtype, inputs.prompt, inputs.negative_prompt, device
        )

    def load(self, mode: Mode) -> None:
        self.model = Checkpoint.open(self.checkpoint).load_model(self.dtype, **mode.ours_load)

    def run(self, mode: Mode, inputs: Inputs, steps: _Steps, decode_too: bool = True) -> None:
        options = {}
        if mode.ours:
            options["performance"] = Performance(**mode.ours)
        stats = StepCacheStats()
        device = None if self.device.type == "cpu" else self.device
        steps.begin()
        latents = sample(
            self.model,
            inputs.identity,
            self.text if self.text is not None else inputs.text,
            seed=SEED,
            steps=inputs.steps,
            guidance_scale=GUIDANCE,
            frames=inputs.frames,
            height=inputs.height,
            width=inputs.width,
            callback=lambda done, _total, latents: steps(done, latents),
            device=device,
            step_cache_stats=stats,
            **options,
        )
        if options.get("performance") is not None and options["performance"].step_cache > 0:
            steps.result.cache_counts = (stats.computed, stats.skipped)
        if decode_too:
            # as the CLI: the transformer is released before the decode (the VAE is all it needs)
            self.vae, self.model = self.model.vae, None
            steps.result.frames = decode(self.vae, latents, device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            steps.result.decode_s = time.perf_counter() - steps.decode_start
            steps.result.decode_mb = steps.memory.peak_mb()

    def decode_only(self, mode: Mode, latents: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        device = None if self.device.type == "cpu" else self.device
        vae = self.vae if self.model is None else self.model.vae
        if mode.name == "tiling":
            return decode(vae, latents, device, tiling=Tiling.halves(inputs.height, inputs.width))
        return decode(vae, latents, device, slicing=True)

    def release(self) -> None:
        self.model = self.vae = self.text = None


class Diffusers:
    name = "diffusers"
    encodes_before_load = False  # pipe(prompt=...) encodes inside the call, its T5 loaded with the rest

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.pipe = None

    def load(self, mode: Mode) -> None:
        from diffusers import ConsisIDPipeline

        pipe = ConsisIDPipeline.from_pretrained(self.checkpoint, torch_dtype=self.dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if mode.name == "offload-model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif mode.name == "offload-sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if mode.name == "fp8":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.dtype)
        if mode.name == "compile":
            pipe.transformer = torch.compile(pipe.transformer)
        self.pipe = pipe

    def run(self, mode: Mode, inputs: Inputs, steps: _Steps, decode_too: bool = True) -> None:
        pipe = self.pipe
        target = pipe.transformer.dtype
        execution = self.device  # where the pipeline puts its inputs
        if inputs.prompt is not None:
            text = dict(prompt=inputs.prompt, negative_prompt=inputs.negative_prompt)
            pipe.encode_prompt = _timed_encode(pipe.encode_prompt, steps)
        else:
            text = dict(prompt_embeds=inputs.text.positive.to(execution, target),
                        negative_prompt_embeds=inputs.text.negative.to(execution, target))
        steps.begin()
        try:
            video = self._call(pipe, inputs, steps, text, decode_too)
        finally:
            vars(pipe).pop("encode_prompt", None)
        if decode_too:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            steps.result.decode_s = time.perf_counter() - steps.decode_start
            steps.result.decode_mb = steps.memory.peak_mb()
            steps.result.frames = video[0].permute(0, 2, 3, 1).float().cpu()

    @staticmethod
    def _call(pipe, inputs: Inputs, steps: _Steps, text: dict, decode_too: bool):
        return pipe(
            image=inputs.identity.face_image_pil(),
            **text,
            height=inputs.height,
            width=inputs.width,
            num_frames=inputs.frames,
            num_inference_steps=inputs.steps,
            guidance_scale=GUIDANCE,
            use_dynamic_cfg=False,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pt" if decode_too else "latent",
            return_dict=False,
            callback_on_step_end=lambda _p, i, _t, tensors: steps(i + 1, tensors["latents"]) or {},
            id_cond=inputs.identity.id_cond,
            id_vit_hidden=list(inputs.identity.id_vit_hidden),
            kps_cond=inputs.identity.kps.numpy(),
        )[0]

    def decode_only(self, mode: Mode, latents: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        if mode.name == "tiling":
            tiling = Tiling.halves(inputs.height, inputs.width)
            factor_height, factor_width = tiling.factors(pipe.vae_scale_factor_spatial)
            vae.enable_tiling(
                tile_sample_min_height=tiling.tile_height,
                tile_sample_min_width=tiling.tile_width,
                tile_overlap_factor_height=factor_height,
                tile_overlap_factor_width=factor_width,
            )
        else:
            vae.enable_slicing()
        try:
            with torch.no_grad():
                video = pipe.decode_latents(latents.to(self.device, vae.dtype))
                video = pipe.video_processor.postprocess_video(video=video, output_type="pt")
        finally:
            vae.disable_tiling()
            vae.disable_slicing()
        return video[0].permute(0, 2, 3, 1).float().cpu()

    def release(self) -> None:
        self.pipe = None


def _timed_encode(encode_prompt, steps: _Steps):
    """`encode_prompt` that closes the text-encode phase (from the call of `pipe(...)`) when it
    returns and starts the sampling phase there, so both paths' phases cover the same work."""

    def timed(*args, **kwargs):
        out = encode_prompt(*args, **kwargs)
        if steps.device.type == "cuda":
            torch.cuda.synchronize(steps.device)
        steps.result.encode_s = time.perf_counter() - steps.start
        steps.result.encode_mb = steps.memory.peak_mb()
        steps.begin()
        return out

    return timed


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(device: torch.device, memory: PeakMemory, work) -> float:
    """Seconds `work()` takes, the GPU's queue drained, with the memory peak reset at its start."""
    memory.reset()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_once(path, mode: Mode, inputs: Inputs, memory: PeakMemory, decode_too: bool = True) -> RunResult:
    """Load, sample, decode (and leave the model loaded for decode modes); errors are recorded."""
    result = RunResult()
    _free(path.device)
    try:
        memory.begin_run()
        if inputs.prompt is not None and path.encodes_before_load:
            result.encode_s = _timed(path.device, memory, lambda: path.encode(inputs))
            result.encode_mb = memory.peak_mb()
        result.load_s = _timed(path.device, memory, lambda: path.load(mode))
        result.load_mb = memory.peak_mb()
        result.held_mb = memory.held_mb()
        path.run(mode, inputs, _Steps(path.device, inputs.steps, memory, result), decode_too)
        result.run_mb, result.run_anon_mb = memory.run_peak_mb()
    except Exception as e:  # a mode that does not work here is a table entry, not the end of the bench
        logger.warning("%s, %s: %s: %s", path.name, mode.name, type(e).__name__, e)
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return result


def run_decode(path, mode: Mode, latents: torch.Tensor, inputs: Inputs, memory: PeakMemory) -> RunResult:
    result = RunResult()
    _free(path.device)
    try:
        def work():
            result.frames = path.decode_only(mode, latents, inputs)

        result.decode_s = _timed(path.device, memory, work)
        result.decode_mb = memory.peak_mb()
    except Exception as e:
        logger.warning("%s, %s: %s: %s", path.name, mode.name, type(e).__name__, e)
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    return result


# ---------------------------------------------------------------------------------------------
# The whole bench


@dataclass
class Results:
    default: dict[str, list[RunResult]]
    modes: dict[str, dict[str, RunResult]]  # mode -> path -> result
    skipped: dict[str, str]  # mode -> why
    memory_label: str
    tiling: str = ""
    prompts: bool = False  # each path encoded the prompt strings (--text t5)


def run_bench(
    checkpoint: Path,
    inputs: Inputs,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    modes: list[str],
) -> Results:
    # both paths' model code imported before anything is timed: the first load must not carry it
    for module in ("diffusers.pipelines.consisid.pipeline_consisid", "consisid_core.decoder"):
        importlib.import_module(module)

    paths = {"ours": Ours(checkpoint, dtype, device), "diffusers": Diffusers(checkpoint, dtype, device)}
    memory = PeakMemory(device)
    default: dict[str, list[RunResult]] = {"ours": [], "diffusers": []}
    mode_results: dict[str, dict[str, RunResult]] = {}
    skipped: dict[str, str] = {}
    chosen = []
    for name in modes:
        mode = MODES[name]
        if mode.gpu_only and device.type != "cuda" and name.startswith("offload"):
            skipped[name] = "needs a GPU (nothing to offload to on the CPU)"
        else:
            chosen.append(mode)
    decode_modes = [m for m in chosen if m.kind == "decode"]
    sample_modes = [m for m in chosen if m.kind == "sample"]
    try:
        for repeat in range(repeats):
            order = ["ours", "diffusers"] if repeat % 2 == 0 else ["diffusers", "ours"]
            for name in order:
                path = paths[name]
                logger.info("repeat %d/%d: %s", repeat + 1, repeats, name)
                result = run_once(path, DEFAULT, inputs, memory)
                default[name].append(result)
                if repeat == repeats - 1 and result.latents is not None:
                    for mode in decode_modes:
                        logger.info("%s: %s", name, mode.label)
                        mode_results.setdefault(mode.name, {})[name] = run_decode(
                            path, mode, result.latents, inputs, memory
                        )
                path.release()
        for mode in sample_modes:
            for name in ("ours", "diffusers"):
                if name == "diffusers" and mode.diffusers is None:
                    continue
                logger.info("%s: %s", name, mode.label)
                # modes that change only the transformer are compared on latents on the CPU, where the
                # real VAE's decode would add minutes and nothing else
                decode_too = device.type == "cuda" or mode.name.startswith("offload")
                result = run_once(paths[name], mode, inputs, memory, decode_too)
                mode_results.setdefault(mode.name, {})[name] = result
                paths[name].release()
    finally:
        memory.close()
    t = Tiling.halves(inputs.height, inputs.width)
    tiling = f"({t.tile_width}×{t.tile_height} px tiles, overlap {t.overlap_width}/{t.overlap_height})"
    return Results(default, mode_results, skipped, memory.label, tiling, inputs.prompt is not None)


def write_section(path: Path, size: str, text: str) -> None:
    """Replace the `<!-- bench:SIZE -->` section of a markdown file with `text`, or append it."""
    begin, end = f"<!-- bench:{size} -->", f"<!-- /bench:{size} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The table


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, unit: str) -> str:
    if value != value:
        return "—"
    if unit == "MB":
        return f"{value:,.0f}"
    if unit == "Δ":
        return f"{value:.1e}"
    if unit == "×":
        return f"{value:.2f}×"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.2f}"


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return float("nan")
    return (a.float() - b.float()).abs().max().item()


def table(results: Results, steps: int) -> str:
    mem = results.memory_label
    rows = ["| mode | metric | ours | diffusers | ours/diffusers |", "|---|---|---:|---:|---:|"]

    def row(mode: str, metric: str, ours: float, theirs: float, unit: str, ratio: bool = True) -> None:
        rows.append(
            f"| {mode} | {metric} | {_fmt(ours, unit)} | {_fmt(theirs, unit)} | "
            f"{_ratio(ours, theirs) if ratio else ''} |"
        )

    def text_row(mode: str, metric: str, ours: str, theirs: str, ratio: str = "") -> None:
        rows.append(f"| {mode} | {metric} | {ours} | {theirs} | {ratio} |")

    ours, theirs = results.default["ours"], results.default["diffusers"]
    n = len(ours)
    encode_rows = (
        ("text encode s (ours: load T5, encode, release; diffusers: its encode_prompt in pipe)", "encode_s", "s"),
        (f"text encode {mem}", "encode_mb", "MB"),
    ) if results.prompts else ()
    if mem.startswith("peak GPU"):
        whole = (("end-to-end peak GPU MB (max allocated, from before load)", "run_mb", "MB"),)
    else:
        whole = (
            ("end-to-end peak RSS MB (from before load)", "run_mb", "MB"),
            ("end-to-end peak RssAnon MB (anonymous memory only, from before load)", "run_anon_mb", "MB"),
        )
    for label, attr, unit in (
        *encode_rows,
        ("load s", "load_s", "s"),
        (f"load {mem}", "load_mb", "MB"),
        ("held after load MB (the loaded weights)", "held_mb", "MB"),
        ("setup + step 1 s (first-frame VAE encode, warm-up)", "setup_s", "s"),
        (f"s/step (steps 2–{steps})" if steps > 1 else "s/step", "step_s", "s"),
        (f"sampling {mem}", "sample_mb", "MB"),
        ("VAE decode s", "decode_s", "s"),
        (f"decode {mem}", "decode_mb", "MB"),
        ("end-to-end s (encode + sample + decode)" if results.prompts else "end-to-end s (sample + decode)",
         "total_s", "s"),
        *whole,
    ):
        row(f"default (median of {n})", label, _median([getattr(r, attr) for r in ours]),
            _median([getattr(r, attr) for r in theirs]), unit)
    diffs = [_max_diff(a.frames, b.frames) for a, b in zip(ours, theirs)]
    text_row(f"default (median of {n})", "max \\|Δ\\| frames, ours vs diffusers (0..1)", _fmt(max(diffs, default=float("nan")), "Δ"), "", "")
    errors = [f"{r.error}" for r in ours + theirs if r.error]
    if errors:
        text_row("default", "errors", "; ".join(errors), "", "")
    base = {name: runs[-1] if runs else RunResult() for name, runs in results.default.items()}
    uncached_step = _median([r.step_s for r in ours])
    uncached_sample = _median([r.sample_s for r in ours])

    for name, by_path in results.modes.items():
        mode = MODES[name]
        o, d = by_path.get("ours", RunResult()), by_path.get("diffusers")
        label = mode.label if name != "tiling" else f"{mode.label} {results.tiling}"
        if o.error or (d is not None and d.error):
            text_row(label, "failed", o.error or "", d.error if d is not None else "", "")
        no = float("nan")
        if mode.kind == "decode":
            row(label, "VAE decode s", o.decode_s, d.decode_s if d else no, "s")
            row(label, f"decode {mem}", o.decode_mb, d.decode_mb if d else no, "MB")
            text_row(label, "max \\|Δ\\| frames vs the same path's default decode",
                     _fmt(_max_diff(o.frames, base["ours"].frames), "Δ"),
                     _fmt(_max_diff(d.frames, base["diffusers"].frames), "Δ") if d else "—")
            text_row(label, "max \\|Δ\\| frames, ours vs diffusers",
                     _fmt(_max_diff(o.frames, d.frames if d else None), "Δ"), "", "")
        elif name.startswith("cache"):
            none = "— (diffusers has no step cache for ConsisID)"
            text_row(label, "s/step (steps 2–N)", _fmt(o.step_s, "s"), none)
            text_row(label, "speed-up vs uncached: s/step", _fmt(uncached_step / o.step_s, "×"), "—")
            text_row(label, "speed-up vs uncached: whole sampling", _fmt(uncached_sample / o.sample_s, "×"), "—")
            if o.cache_counts:
                text_row(label, "transformer forwards computed / skipped", "%d / %d" % o.cache_counts, "—")
            text_row(label, "max \\|Δ\\| latents vs uncached", _fmt(_max_diff(o.latents, base["ours"].latents), "Δ"), "—")
        else:
            decoded = o.frames is not None or (d is not None and d.frames is not None)
            metrics = [("load s", "load_s", "s"), ("held after load MB (the loaded weights)", "held_mb", "MB"),
                       ("s/step (steps 2–N)", "step_s", "s"),
                       ("sampling s", "sample_s", "s"), (f"sampling {mem}", "sample_mb", "MB")]
            if decoded:
                metrics += [("VAE decode s", "decode_s", "s"), (f"decode {mem}", "decode_mb", "MB"),
                            ("end-to-end s", "total_s", "s")]
            for metric, attr, unit in metrics:
                row(label, metric, getattr(o, attr), getattr(d, attr) if d else no, unit)
            what = "frames" if decoded else "latents"
            text_row(label, f"max \\|Δ\\| {what} vs the same path's default",
                     _fmt(_max_diff(getattr(o, what), getattr(base["ours"], what)), "Δ"),
                     _fmt(_max_diff(getattr(d, what), getattr(base["diffusers"], what)), "Δ") if d else "— (no counterpart)")
            if d is not None:
                text_row(label, f"max \\|Δ\\| {what}, ours vs diffusers",
                         _fmt(_max_diff(getattr(o, what), getattr(d, what)), "Δ"), "", "")
    for name, why in results.skipped.items():
        text_row(MODES[name].label, "not run", why, "", "")
    return "\n".join(rows)


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' per-load warnings (sample size, dtype casts) would drown the log."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    consisid = logging.getLogger("consisid_core")
    saved = consisid.level
    consisid.setLevel(logging.ERROR)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        consisid.setLevel(saved)
