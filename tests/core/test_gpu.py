"""On a CUDA GPU (skipped without one): models go to the GPU for a run and leave nothing there
after it, after an error and after a Cancel; the memory modes and SageAttention run there; and,
with a ComfyUI source folder in COMFYUI_DIR, ComfyUI's model management holding our models
(resident between runs, evicted, partial load, accounting after Cancel and errors).

Run on a lent GPU machine with `python -m pytest tests/core/test_gpu.py`.
"""

import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consisid_core.checkpoint import Checkpoint
from consisid_core.errors import GenerationCancelled
from consisid_core.performance import Performance
from consisid_core.sampling import decode, sample
from workflow_tools import COMFY_SCRIPTS, script_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SLACK = 2**20
"""Bytes of GPU memory a finished run may leave allocated (none expected; this allows an allocator block)."""


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _all_on_cpu(*modules: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for m in modules for t in [*m.parameters(), *m.buffers()])


def test_a_run_uses_the_gpu_and_leaves_nothing_there(tiny_model, identity, text):
    baseline = _allocated()
    torch.cuda.reset_peak_memory_stats()
    on_cpu = sample(tiny_model, identity, text, steps=3, device="cpu")
    on_gpu = sample(tiny_model, identity, text, steps=3, device="cuda")
    assert torch.cuda.max_memory_allocated() > baseline  # the run did happen on the GPU
    assert on_gpu.device.type == "cpu"
    assert (on_gpu - on_cpu).abs().max() <= 1e-2 * on_cpu.abs().max()  # cuDNN convolutions run in TF32
    frames = decode(tiny_model.vae, on_gpu, "cuda")
    assert frames.device.type == "cpu"
    assert _all_on_cpu(tiny_model.transformer, tiny_model.vae)
    assert _allocated() <= baseline + SLACK


@pytest.mark.parametrize("failure", [GenerationCancelled("cancelled"), RuntimeError("an error mid-run")])
def test_nothing_stays_on_the_gpu_after_a_cancel_or_an_error(tiny_model, identity, text, failure):
    baseline = _allocated()

    def stop(step, total, latents):
        if step == 2:
            raise failure

    with pytest.raises(type(failure)):
        sample(tiny_model, identity, text, steps=4, device="cuda", callback=stop,
               performance=Performance(step_cache=0.5))
    assert _all_on_cpu(tiny_model.transformer, tiny_model.vae)
    assert _allocated() <= baseline + SLACK
    sample(tiny_model, identity, text, steps=2, device="cuda")  # the next run works


def test_sequential_offload_streams_the_transformer_and_cleans_up(tiny_model, identity, text):
    baseline = _allocated()
    plain = sample(tiny_model, identity, text, steps=3, device="cuda")
    streamed = sample(tiny_model, identity, text, steps=3, device="cuda", performance=Performance(offload="sequential"))
    assert (streamed - plain).abs().max() <= 1e-3 * plain.abs().max()
    assert _all_on_cpu(tiny_model.transformer, tiny_model.vae)
    assert _allocated() <= baseline + SLACK


def test_sage_attention_stays_close_to_sdpa(tiny_dir, identity, text):
    pytest.importorskip("sageattention")
    from diffusers import ConsisIDTransformer3DModel

    # SageAttention takes heads of 64, 96 or 128: the tiny transformer's width as one head of 64
    model = Checkpoint.open(tiny_dir).load_model("bf16")
    torch.manual_seed(0)
    config = {**model.config, "num_attention_heads": 1, "attention_head_dim": 64}
    transformer = ConsisIDTransformer3DModel.from_config(config).to(torch.bfloat16).eval()
    model = dataclasses.replace(model, transformer=transformer)
    plain = sample(model, identity, text, steps=3, device="cuda").float()
    sage = sample(model, identity, text, steps=3, device="cuda", performance=Performance(attention="sage")).float()
    assert not torch.equal(sage, plain)
    assert (sage - plain).abs().max() <= 0.1 * plain.abs().max()  # int8 attention: close, not equal
    assert _all_on_cpu(model.transformer, model.vae)


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")
def test_comfyui_holds_our_models_on_the_gpu(tiny_dir):
    """tests/comfyui/comfy_gpu_memory.py in ComfyUI's own process set-up: resident, evicted, partial load
    (fp8 too) equal to a full load with less memory, Cancel and errors leave the accounting right."""
    comfyui = os.environ["COMFYUI_DIR"]
    script = COMFY_SCRIPTS / "comfy_gpu_memory.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_dir)], cwd=comfyui, capture_output=True, text=True, timeout=900,
        env=script_env(comfyui),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu memory: all ok" in result.stdout


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")
@pytest.mark.parametrize("mode", ["classic", "dynamic"])
def test_comfyui_loads_the_native_model_on_the_gpu(native_tiny_dir, mode):
    """tests/comfyui/comfy_native_gpu.py in ComfyUI's own process set-up, with dynamic VRAM off (classic, a
    forced partial load) and on: the native MODEL's face layers on the GPU and off it again, a
    partial load equal to a whole one, fp8 weights."""
    from native_tools import NATIVE_COGVIDEOX

    if not NATIVE_COGVIDEOX:
        pytest.skip("this ComfyUI has no native CogVideoX")
    comfyui = os.environ["COMFYUI_DIR"]
    folder = native_tiny_dir
    script = COMFY_SCRIPTS / "comfy_native_gpu.py"
    result = subprocess.run(
        [sys.executable, str(script), str(folder), mode], cwd=comfyui, capture_output=True, text=True, timeout=900,
        env=script_env(comfyui),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "native gpu: all ok" in result.stdout


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")
@pytest.mark.parametrize("mode", ["classic", "dynamic"])
def test_comfyui_fits_both_paths_at_real_size_in_12_gb(tmp_path, native_tiny_dir, mode):
    """tests/comfyui/comfy_budget_gpu.py on a ComfyUI with dynamic VRAM (v0.33), with it on and off: ConsisID's
    real-size transformer (random weights) on a 12 GB card, the wrapper's and the native MODEL, each
    beside the other, loaded partly and within the budget, and nothing left on the GPU after."""
    from native_tools import NATIVE_COGVIDEOX

    comfyui = os.environ["COMFYUI_DIR"]
    patchers = Path(comfyui, "comfy", "model_patcher.py").read_text(encoding="utf-8")
    if not NATIVE_COGVIDEOX or "class ModelPatcherDynamic" not in patchers:
        pytest.skip("this ComfyUI has no native CogVideoX or no dynamic VRAM")
    folder = native_tiny_dir
    script = COMFY_SCRIPTS / "comfy_budget_gpu.py"
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "scratch"), mode], cwd=comfyui, capture_output=True,
        text=True, timeout=900,
        env=script_env(comfyui),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-3000:])  # the peaks and loaded sizes, for the runbook (pytest -s)
    assert "12 GB budget: all ok" in result.stdout
