"""The benchmark keeps working: `python -m bench` on the tiny size, briefly. Nothing about speed is asserted."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_tiny_bench_prints_the_table_and_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- bench:tiny -->\nold table\n<!-- /bench:tiny -->\n\nkept\n", encoding="utf-8")
    run = _bench("--size", "tiny", "--steps", "2", "--repeats", "1", "--modes", "tiling,cache-0.1",
                 "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    table = run.stdout
    for metric in ("load s", "s/step", "VAE decode s", "end-to-end s", "peak RSS MB", "VAE tiling"):
        assert metric in table
    # the two paths run the same weights on the same inputs: identical frames
    diff = next(line for line in table.splitlines() if "ours vs diffusers (0..1)" in line)
    assert float(re.search(r"\(0\.\.1\) \| ([^ |]+) \|", diff).group(1)) <= 1e-4
    written = out.read_text(encoding="utf-8")
    assert "old table" not in written and "kept" in written and "| default (median of 1) | load s |" in written


def test_tiny_bench_with_prompts_encodes_them_in_both_paths():
    run = _bench("--size", "tiny", "--text", "t5", "--steps", "2", "--repeats", "1", "--modes", "none",
                 "--device", "cpu")
    assert run.returncode == 0, run.stderr[-2000:]
    table = run.stdout
    for metric in ("text encode s", "end-to-end s (encode + sample + decode)",
                   "end-to-end peak RSS MB (from before load)"):
        assert metric in table
    # both encode the same prompts with the same T5: identical frames
    diff = next(line for line in table.splitlines() if "ours vs diffusers (0..1)" in line)
    assert float(re.search(r"\(0\.\.1\) \| ([^ |]+) \|", diff).group(1)) <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real size is refused only without a GPU")
def test_real_size_is_refused_on_the_cpu():
    run = _bench("--size", "real", "--device", "cpu", timeout=120)
    assert run.returncode == 2
    assert "needs a GPU" in run.stderr and run.stdout == ""


def test_peak_memory_runs_each_path_in_its_own_process():
    run = subprocess.run(
        [sys.executable, "-m", "bench.peak_memory", "--size", "tiny", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("| whole-run peak RSS MB"))
    ours, theirs = (float(cell.replace(",", "")) for cell in row.split("|")[2:4])
    assert ours > 0 and theirs > 0
