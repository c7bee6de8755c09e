"""The benchmark keeps working: `python -m bench` on the tiny size, briefly. Nothing about speed is asserted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_tiny_bench_prints_the_table_and_writes_its_section(tmp_path):
    """With prompts (both paths encode them), tiling and the step cache: the table, and its section of
    the results file replaced."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- bench:tiny-t5 -->\nold table\n<!-- /bench:tiny-t5 -->\n\nkept\n", encoding="utf-8")
    run = _bench("--size", "tiny", "--text", "t5", "--steps", "2", "--repeats", "1", "--modes", "tiling,cache-0.1",
                 "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    table = run.stdout
    for metric in ("text encode s", "load s", "s/step", "VAE decode s", "end-to-end s (encode + sample + decode)",
                   "end-to-end peak RSS MB (from before load)", "VAE tiling", "step cache 0.1"):
        assert metric in table
    # the two paths encode the same prompts and run the same weights on the same inputs: identical frames
    diff = next(line for line in table.splitlines() if "ours vs diffusers (0..1)" in line)
    assert float(re.search(r"\(0\.\.1\) \| ([^ |]+) \|", diff).group(1)) <= 1e-4
    written = out.read_text(encoding="utf-8")
    assert "old table" not in written and "kept" in written and "| default (median of 1) | load s |" in written


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the real size is refused only without a GPU")
def test_real_size_is_refused_on_the_cpu():
    run = _bench("--size", "real", "--device", "cpu", timeout=120)
    assert run.returncode == 2
    assert "needs a GPU" in run.stderr and run.stdout == ""


@pytest.mark.slow
def test_peak_memory_runs_each_path_in_its_own_process(tmp_path):
    from bench.peak_memory import measure
    from bench.sizes import SIZES, build_checkpoint

    size = SIZES["tiny"]
    folder = build_checkpoint(size, tmp_path / "checkpoint", text="t5")
    runs = [measure(path, folder, size) for path in ("ours", "diffusers")]
    pids = [run["pid"] for run in runs]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # a fresh process per run
    for run in runs:  # each made the whole video, and its peak is its own run's
        assert run["frames"] == [size.frames, size.height, size.width, 3]
        assert run["peak_mb"] > 0


def test_live_bytes_counts_storages_until_their_last_view_dies():
    from bench.gpu_memory import LiveBytes

    weight = torch.empty(1000, device="meta")  # existed before: not counted, nor views of it
    with LiveBytes([weight]) as counter:
        x = torch.empty(1000, 1000, device="meta")  # 4 MB
        y = x * 2
        view = y.view(-1)
        _ = weight.view(10, 100)
        assert counter.live == counter.peak == 8_000_000
        del x
        assert counter.live == 4_000_000
        del y
        assert counter.live == 4_000_000  # the view keeps y's storage alive
        del view
        assert counter.live == 0 and counter.peak == 8_000_000


def test_fused_attention_is_counted_without_the_score_matrix():
    from bench.gpu_memory import peak_bytes

    q = torch.empty(1, 2, 4096, 64, device="meta", dtype=torch.bfloat16)
    peak = peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), [q])
    assert peak == q.numel() * 2 + 2 * 4096 * 4  # output and float32 log-sum-exp; scores would be 64 MB


@pytest.mark.slow
def test_gpu_memory_estimate_runs_on_the_cpu():
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_memory", "--size", "tiny", "--dtype", "fp32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in run.stdout.splitlines() if line.startswith("| ")}
    whole, tiled = (float(rows[f"decode, {m} (VAE)"][1]) for m in ("whole frames", "half-frame tiles"))
    assert 0 < tiled < whole


@pytest.mark.slow
def test_the_nodes_memory_requests_agree_with_the_estimate_at_the_real_size():
    """`decode_memory` and `sampling_memory` (what the nodes ask ComfyUI to free) against
    `bench.gpu_memory`'s count of live tensors, both at 49 frames of 480×720 in bf16."""
    from bench.gpu_memory import FORWARD, meta_models, phase_peaks
    from bench.sizes import SIZES
    from consisid_core.memory import decode_memory, sampling_memory
    from consisid_core.tiling import Tiling

    size = SIZES["real"]
    models = meta_models(size, torch.bfloat16)
    peaks = phase_peaks(size, models, torch.bfloat16)
    latents = (1, 13, 16, 60, 90)
    sampling = max(peaks["first frame encode"], peaks[FORWARD])
    vae = models.vae.config, torch.bfloat16
    assert sampling_memory(models.transformer.config, *vae, 49, 480, 720) == pytest.approx(sampling, rel=0.05)
    assert decode_memory(*vae, latents) == pytest.approx(peaks["decode, whole frames"], rel=0.05)
    tiled = decode_memory(*vae, latents, Tiling.halves(480, 720))
    assert tiled == pytest.approx(peaks["decode, half-frame tiles"], rel=0.05)
