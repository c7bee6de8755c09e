"""Peak memory while the bench runs: per phase and over a whole run.

On the CPU the resident set (VmRSS, and its anonymous part RssAnon) is polled every 5 ms in a
thread and reported above its value when the phase (or run) began; on a GPU
`torch.cuda.max_memory_allocated` after a reset at the phase start. bench/README.md, "What the
rows mean", says what each row is.
"""

from __future__ import annotations

import gc
import os
import threading

import torch


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
