"""Our path against `diffusers.ConsisIDPipeline`: same files, same inputs, same process, alternating.

One run of a contender is: load, (encode,) sample, decode, release, each phase timed and its peak
memory taken (`measuring.PeakMemory`). Repeats alternate which contender goes first; `report.table`
shows medians. bench/README.md says what each row means.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from consisid_core.tiling import Tiling

from .contenders import DEFAULT, MODES, Diffusers, Inputs, Mode, Ours, RunResult, Steps
from .measuring import PeakMemory

logger = logging.getLogger(__name__)

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
        path.run(mode, inputs, Steps(path.device, inputs.steps, memory, result), decode_too)
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
