"""`--parallel`: one video over several processes (gloo on the CPU), against the one-process run.

The multi-process cases run under `torchrun` (`python -m torch.distributed.run --standalone`),
few launches, each running several cases: this file is also the script each rank runs (`main`).
Tolerance: max |Δ| <= 1e-4 on fp32 frames in 0..1, as the parity tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consisid_core import cli, diffusers_hooks
from consisid_core.checkpoint import Checkpoint
from consisid_core.errors import ConsisIDError
from consisid_core.parallel import Parallel, check_parallel, plan, video_tokens
from consisid_core.performance import Performance
from consisid_core.sampling import decode, sample
from consisid_core.text import MAX_SEQUENCE_LENGTH, TextEmbeddings
from consisid_core.tiny import random_identity

TOLERANCE = 1e-4
STEPS = 2
VARIANTS = [(kps, dynamic) for kps in (False, True) for dynamic in (False, True)]
"""(is_kps checkpoint, dynamic CFG): every split runs each."""

needs_api = pytest.mark.skipif(
    diffusers_hooks._release(diffusers_hooks.diffusers_version()) < diffusers_hooks.PARALLEL_DIFFUSERS,
    reason="diffusers' context parallelism as --parallel needs it",
)


def _inputs(model):
    identity = random_identity(model.config, seed=7)
    g = torch.Generator().manual_seed(0)
    width = model.config.text_embed_dim
    text = TextEmbeddings(*(torch.randn(1, MAX_SEQUENCE_LENGTH, width, generator=g) for _ in range(2)))
    return identity, text


def _latents(model, dynamic: bool, parallel=None, seed: int = 3) -> torch.Tensor:
    identity, text = _inputs(model)
    return sample(model, identity, text, steps=STEPS, seed=seed, dynamic_cfg=dynamic, device="cpu", parallel=parallel)


def _torchrun(processes: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


# --- one process -----------------------------------------------------------------------------


def test_parse():
    assert Parallel.parse("ulysses=2,cfg=2") == Parallel(ulysses=2, cfg=2)
    assert Parallel.parse(" ring=2 ").world_size == 2
    assert str(Parallel.parse("cfg=2,ulysses=2")) == "ulysses=2,cfg=2"
    for bad in ("", "ulysses", "ulysses=two", "tensor=2", "ulysses=2,ulysses=2", "ring=0", "cfg=4", "ring=-1"):
        with pytest.raises(ConsisIDError) as e:
            Parallel.parse(bad)
        assert "\n" not in str(e.value) and ("parallel" in str(e.value))


def test_refused_without_torchrun(tiny_dir, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out.mp4"
    code = cli.main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--parallel", "ulysses=2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --parallel needs one process per rank, started by torchrun")
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize(
    "split, options, message",
    [
        ("ulysses=2,cfg=2", {}, "needs 4 processes (the product of the degrees), torchrun started 2"),
        ("cfg=2", {"guidance": 1.0}, "guidance 1.0 (1 or less) turns guidance off"),
        ("ulysses=2", {"performance": Performance(step_cache=0.1)}, "does not combine with the step cache"),
        ("ring=2", {"performance": Performance(compile=True)}, "does not combine with compile"),
        ("ring=2", {"size": (9, 16, 16)}, "must share 226 text and 3 video tokens equally"),
        ("ring=2", {"device": "cuda", "dtype": torch.float32}, "ring=2 on a GPU needs a bf16 or fp16 model"),
    ],
)
def test_refused_splits(tiny_model, two_ranks, split, options, message):
    args = {"size": (9, 64, 96), "guidance": 6.0, "performance": Performance(), "device": "cpu",
            "dtype": torch.float32, **options}
    with pytest.raises(ConsisIDError) as e:
        check_parallel(Parallel.parse(split), tiny_model.config, tiny_model.vae.config, args["size"], args["guidance"],
              args["performance"], args["device"], args["dtype"], MAX_SEQUENCE_LENGTH)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ulysses_must_divide_the_heads(tiny_model, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConsisIDError, match="ulysses=4 does not divide this transformer's 2 attention heads"):
        check_parallel(Parallel(ulysses=4), tiny_model.config, tiny_model.vae.config, (9, 64, 96), 6.0, Performance(), "cpu",
              torch.float32, MAX_SEQUENCE_LENGTH)


def test_older_diffusers_refused_with_the_version_needed(tiny_model, two_ranks, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    with pytest.raises(diffusers_hooks.HookApiError) as e:
        check_parallel(Parallel(ulysses=2), tiny_model.config, tiny_model.vae.config, (9, 64, 96), 6.0, Performance(), "cpu",
              torch.float32, MAX_SEQUENCE_LENGTH)
    needed = ".".join(map(str, diffusers_hooks.PARALLEL_DIFFUSERS))
    assert f"needs diffusers >= {needed} (its context parallelism; this is 0.35.2)" in str(e.value)
    # cfg alone is torch.distributed only: no diffusers internals, no version needed
    check_parallel(Parallel(cfg=2), tiny_model.config, tiny_model.vae.config, (9, 64, 96), 6.0, Performance(), "cpu",
          torch.float32, MAX_SEQUENCE_LENGTH)


@needs_api
def test_plan(tiny_model):
    layout = plan(tiny_model.transformer)
    assert set(layout) == {"transformer_blocks.0", "transformer_blocks.*", "transformer_blocks.1"}
    first = layout["transformer_blocks.0"]
    assert {name: (c.split_dim, c.expected_dims) for name, c in first.items()} == {
        "hidden_states": (1, 3), "encoder_hidden_states": (1, 3)
    }
    assert [(c.split_dim, c.expected_dims) for c in layout["transformer_blocks.*"]["image_rotary_emb"]] == [(0, 2)] * 2
    assert [(c.gather_dim, c.expected_dims) for c in layout["transformer_blocks.1"]] == [(1, 3)] * 2
    # the face layers are left whole: nothing of the plan names them
    assert not any("facial" in key or "perceiver" in key for key in layout)


def test_self_attention_makes_one_sdpa_call(tiny_model):
    block = tiny_model.transformer.transformer_blocks[0]
    width = tiny_model.config.num_attention_heads * tiny_model.config.attention_head_dim
    assert diffusers_hooks.sdpa_calls(block.attn1, width, torch.float32) == 1
    assert diffusers_hooks.cpu_lse_problems() == []

    class Manual(torch.nn.Module):  # an attention that computes its softmax itself: the probe sees no call
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

        def forward(self, hidden_states, encoder_hidden_states):
            x = self.proj(torch.cat([encoder_hidden_states, hidden_states], 1))
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    assert diffusers_hooks.sdpa_calls(Manual(), width, torch.float32) == 0


@needs_api
def test_missing_diffusers_internal_refused(monkeypatch):
    from diffusers.models import attention_dispatch

    monkeypatch.delattr(attention_dispatch, "_templated_context_parallel_attention")
    with pytest.raises(diffusers_hooks.HookApiError) as e:
        diffusers_hooks.context_parallel_api("--parallel ulysses/ring")
    assert "needs diffusers >= 0." in str(e.value) and "_templated_context_parallel_attention" in str(e.value)


# --- several processes -------------------------------------------------------------------------

SPLITS_2 = ["ulysses=2", "ring=2", "cfg=2"]
SPLITS_4 = ["ulysses=2,cfg=2", "ring=2,cfg=2"]
REFUSALS_2 = {
    "product": (["--parallel", "ulysses=2,cfg=2"], "error: --parallel ulysses=2,cfg=2 needs 4 processes"),
    "guidance": (["--parallel", "cfg=2", "--cfg", "1"], "error: --parallel cfg=2 splits the guided batch"),
    "step-cache": (["--parallel", "ring=2", "--step-cache", "0.1"], "error: --parallel does not combine with the step"),
    "tokens": (["--parallel", "ulysses=2", "--height", "16", "--width", "16"], "must share 226 text and 3 video tokens"),
}
REFUSALS_4 = {"heads": (["--parallel", "ulysses=4"], "error: --parallel ulysses=4 does not divide this transformer's 2")}


@pytest.fixture(scope="module")
def one_process(tiny_dir, tiny_kps_dir) -> dict:
    """The one-process frames of each variant, and the models."""
    models = {kps: Checkpoint.open(tiny_kps_dir if kps else tiny_dir).load_model("fp32") for kps in (False, True)}
    frames = {(kps, dynamic): decode(models[kps].vae, _latents(models[kps], dynamic), "cpu") for kps, dynamic in VARIANTS}
    assert min(f.std().item() for f in frames.values()) > 0.01
    other = decode(models[False].vae, _latents(models[False], False, seed=4), "cpu")
    assert (other - frames[False, False]).abs().max().item() > 100 * TOLERANCE  # the comparison can fail
    return {"models": models, "frames": frames}


@needs_api
@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_frames_equal_one_process(one_process, tiny_dir, tiny_kps_dir, tmp_path, processes):
    """Each split, with is_kps and dynamic CFG on and off, gives the one-process frames on rank 0 and
    the same latents on every rank; the blocks saw 1/N of the tokens (or half the batch); and each
    refused split stops every rank, writing nothing, with one line from rank 0."""
    splits, refusals = (SPLITS_2, REFUSALS_2) if processes == 2 else (SPLITS_4, REFUSALS_4)
    _torchrun(processes, __file__, str(tmp_path), str(tiny_dir), str(tiny_kps_dir), *splits)
    models = one_process["models"]
    for kps, dynamic in VARIANTS:
        want = one_process["frames"][kps, dynamic]
        for split in splits:
            case = f"{split}-kps{int(kps)}-dynamic{int(dynamic)}"
            got = load_file(tmp_path / f"{case}.safetensors")
            assert (got["frames"] - want).abs().max().item() <= TOLERANCE, case
            for rank in range(1, processes):
                assert torch.equal(load_file(tmp_path / f"{case}-rank{rank}.safetensors")["latents"], got["latents"])
    for rank in range(processes):
        seen = json.loads((tmp_path / f"seen-rank{rank}.json").read_text())
        tokens = video_tokens(models[False].config, models[False].vae.config, 9, 64, 96)
        for split in splits:
            spec = Parallel.parse(split)
            # [batch, video tokens, width] inside the blocks: split by ulysses × ring, batch by cfg
            assert seen[split] == [2 // spec.cfg, tokens // spec.sequence], split
        results = json.loads((tmp_path / f"refusals-rank{rank}.json").read_text())
        assert set(results) == set(refusals)
        for name, (_, message) in refusals.items():
            code, err = results[name]
            assert code == 2, (rank, name, err)
            if rank == 0:
                assert err.startswith("error: ") and message.removeprefix("error: ") in err, (name, err)
                assert err.count("\n") == 1
            else:  # every rank refuses the same: rank 0 alone says it
                assert err == "", (rank, name, err)
    assert not list((tmp_path / "refused").iterdir())


@needs_api
@pytest.mark.slow
def test_command_line(tiny_dir, tmp_path):
    """`torchrun … -m consisid_core generate --parallel --face PHOTO`: rank 0 alone runs the face
    models and the T5 and sends the results on; it writes the frames of the one-process command
    (PNG, so within one step of 8 bits), and nothing else is left. Rank 0 alone says what every rank
    would (an old option's spelling, the frames written)."""
    import numpy as np
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    (tmp_path / "in").mkdir()
    photo = tmp_path / "in" / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    out = tmp_path / "parallel"
    common = ["--model", str(tiny_dir), "--face", str(photo), "--prompt", "an astronaut smiling", "--steps", str(STEPS),
              "--seed", "5", "--dynamic-cfg"]
    done = _torchrun(2, "-m", "consisid_core", "generate", *common, "--guidance", "6", "--parallel", "cfg=2",
                     "--out", str(out))
    assert done.stderr.count("wrote 9 frames") == 1 and done.stderr.count("--guidance is now --cfg") == 1
    assert cli.main(["generate", *common, "--out", str(tmp_path / "single")]) == 0
    ours = sorted(out.iterdir())
    assert [p.name for p in ours] == [p.name for p in sorted((tmp_path / "single").iterdir())]
    assert len(ours) == 9 and sorted(p.name for p in tmp_path.iterdir()) == ["in", "parallel", "single"]
    for path in ours:
        a = np.asarray(Image.open(path)).astype(int)
        b = np.asarray(Image.open(tmp_path / "single" / path.name)).astype(int)
        assert np.abs(a - b).max() <= 1, path.name


@pytest.mark.slow
def test_bench_row(tmp_path):
    """`python -m bench.parallel`: one launch per split, its ratio to the one-process run and the
    latents' max |Δ|, into its section of the results file."""
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench.parallel", "--size", "tiny", "--steps", "2", "--splits", "cfg=2",
               "--out", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert text.startswith("<!-- bench:parallel-tiny -->")
    assert [[cell.strip() for cell in row[:3]] for row in rows] == [
        ["1", str(os.cpu_count()), "one process"], ["1", "1", "one process"], ["2", str(max(1, os.cpu_count() // 2)), "cfg=2"]
    ]
    row = rows[-1]
    assert float(row[-1]) <= TOLERANCE  # the latents' max |Δ| against one process


# --- what each rank runs under torchrun ----------------------------------------------------------


def main(out: Path, folder: Path, kps_folder: Path, splits: list[str]) -> None:
    import contextlib
    import io

    from consisid_core import parallel

    rank, world_size, _ = parallel.launched()
    parallel.start(torch.device("cpu"))  # once: a process group cannot be joined again after it is left
    refused = out / "refused"
    refused.mkdir(exist_ok=True)
    cli.RANK_0_SECONDS = 0  # the ranks refuse in turn, each staying on: none waits for torchrun to end it
    results = {}
    for name, (args, _) in (REFUSALS_2 if world_size == 2 else REFUSALS_4).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "2", *args,
                             "--out", str(refused / f"{name}-{rank}.mp4")])
        results[name] = (code, err.getvalue())
    (out / f"refusals-rank{rank}.json").write_text(json.dumps(results))

    seen = {}
    for kps in (False, True):
        model = Checkpoint.open(kps_folder if kps else folder).load_model("fp32")
        shapes = []
        watch = model.transformer.transformer_blocks[-1].register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(list(kwargs["hidden_states"].shape[:2])), with_kwargs=True
        )
        for split in splits:
            for dynamic in (False, True):
                shapes.clear()
                latents = _latents(model, dynamic, Parallel.parse(split))
                seen[split] = shapes[0]
                case = f"{split}-kps{int(kps)}-dynamic{int(dynamic)}"
                if rank == 0:  # decoding is one process's work: rank 0 alone decodes
                    frames = decode(model.vae, latents, "cpu").contiguous()
                    save_file({"latents": latents, "frames": frames}, out / f"{case}.safetensors")
                else:
                    save_file({"latents": latents}, out / f"{case}-rank{rank}.safetensors")
        watch.remove()
        left = [m for m in model.transformer.modules() if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks]
        assert not left, f"hooks left after the runs on {left}"
    (out / f"seen-rank{rank}.json").write_text(json.dumps(seen))
    parallel.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
