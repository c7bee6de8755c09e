"""Long videos: segments chained on their last frame, written as a stream, in the CLI and in a graph."""

import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from consisid_core.cli import main
from consisid_core.errors import ConsisIDError
from consisid_core.identity import load_identity
from consisid_core.media import FrameWriter, to_uint8, write_frames
from consisid_core.segments import (
    MAX_SEGMENTS, ColourReference, check_segments, generate_segments, segment_prompts, segment_seed,
)
from process_tools import signal_when, start

F = 9  # the tiny checkpoint's trained frame count


def _png_frames(folder: Path) -> np.ndarray:
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(len(files))]
    return np.stack([np.asarray(Image.open(f)) for f in files])


def _mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_segment_seeds_and_counts():
    assert [segment_seed(42, k) for k in (1, 2, 3)] == [42, 43, 44]
    assert segment_seed(2**64 - 1, 2) == 0  # wraps within the seeds a run accepts
    assert check_segments(MAX_SEGMENTS) == MAX_SEGMENTS
    with pytest.raises(ConsisIDError, match=f"segment count 33 must be a whole number from 1 to {MAX_SEGMENTS}"):
        check_segments(MAX_SEGMENTS + 1)
    with pytest.raises(ConsisIDError, match="segments of 1 frame add nothing"):
        check_segments(2, 1)
    assert segment_prompts(["a"], 3) == ["a", "a", "a"]
    assert segment_prompts(["a", "b", "c"], 3) == ["a", "b", "c"]
    with pytest.raises(ConsisIDError, match="2 prompts for 3 segments: give one prompt for the whole video, or exactly"):
        segment_prompts(["a", "b"], 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--segments", "3", "--prompt", "b"], "2 prompts for 3 segments: give one prompt for the whole video"),
        (["--segments", "33"], "segment count 33 must be a whole number from 1 to 32"),
        (["--segments", "0"], "segment count 0 must be a whole number from 1 to 32"),
        (["--segments", "2", "--length", "1"], "segments of 1 frame add nothing"),
    ],
)
def test_bad_segment_arguments_exit_2_with_one_line_and_write_nothing(tiny_dir, identity_file, tmp_path, capsys,
                                                                       extra, message):
    out = tmp_path / "out"
    out.mkdir()
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "a", "--steps", "1"]
    assert main(args + extra + ["--out", str(out / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_two_segments_equal_two_runs_by_hand(tiny_dir, identity_file, tmp_path, capsys):
    """`--segments 2` with a prompt each = `generate` with the seed, then `generate` with the seed + 1,
    the second prompt and the first run's last frame as --image; the seam frame once."""
    common = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--steps", "2"]
    assert main(common + ["--seed", "7", "--segments", "2", "--prompt", "a man walking", "--prompt", "a man waving",
                          "--out", str(tmp_path / "long")]) == 0
    assert "segment 2/2: 100%" in capsys.readouterr().err  # the progress bar names the segment
    assert main(common + ["--seed", "7", "--prompt", "a man walking", "--out", str(tmp_path / "one")]) == 0
    one = _png_frames(tmp_path / "one")
    Image.fromarray(one[-1]).save(tmp_path / "last.png")
    assert main(common + ["--seed", "8", "--prompt", "a man waving", "--start-image", str(tmp_path / "last.png"),
                          "--out", str(tmp_path / "two")]) == 0
    two = _png_frames(tmp_path / "two")
    long = _png_frames(tmp_path / "long")
    assert len(long) == 2 * F - 1
    assert np.array_equal(long, np.concatenate([one, two[1:]]))
    assert not np.array_equal(long[F - 1], long[F])  # the shared frame is there once: no repeat at the seam
    assert not np.array_equal(two[0], one[-1])  # (segment 2's own first frame is a decode, not the one it starts from)


@pytest.mark.slow
def test_streamed_writing_equals_writing_at_once(tiny_model, identity, text, tmp_path):
    segments = list(generate_segments(tiny_model, identity, [text] * 3, seed=5, steps=2))
    assert [len(s) for s in segments] == [F, F - 1, F - 1]
    whole = torch.cat(segments)
    for name in ("streamed", "streamed.mp4"):
        with FrameWriter(tmp_path / name, fps=8) as writer:
            for segment in segments:
                assert not (tmp_path / name).exists()  # nothing at --out until the whole video is there
                writer.write(segment)
        assert writer.count == 3 * F - 2
    write_frames(whole, tmp_path / "at_once")
    write_frames(whole, tmp_path / "at_once.mp4")
    assert np.array_equal(_png_frames(tmp_path / "streamed"), to_uint8(whole))
    assert np.array_equal(_png_frames(tmp_path / "streamed"), _png_frames(tmp_path / "at_once"))
    # x264 (through PyAV) is not bit-reproducible from one encode to the next here, at once ones included
    # (4 encodes of the same frames: 0 to 0.25 levels apart on average): the .mp4s agree as encodes do
    streamed, at_once = _mp4_frames(tmp_path / "streamed.mp4"), _mp4_frames(tmp_path / "at_once.mp4")
    assert streamed.shape == at_once.shape == (3 * F - 2, 64, 96, 3)
    assert np.abs(streamed.astype(int) - at_once).mean() <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at_once", "at_once.mp4", "streamed", "streamed.mp4"]


def test_the_writer_refuses_frames_of_another_size_and_leaves_nothing(tmp_path):
    for name in ("v.mp4", "frames"):
        with pytest.raises(ConsisIDError, match="frames of 48×32 after frames of 32×16: every frame of one video"):
            with FrameWriter(tmp_path / name) as writer:
                writer.write(torch.rand(3, 16, 32, 3))
                writer.write(torch.rand(2, 32, 48, 3))
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v.mp4", "frames"])
def test_cancel_in_segment_2_leaves_nothing_at_out(tiny_model, identity, text, tmp_path, name):
    seen = []

    def stop(segment, done, total, latents):
        seen.append((segment, done))
        if segment == 2 and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), FrameWriter(tmp_path / name) as writer:
        for segment in generate_segments(tiny_model, identity, [text] * 3, steps=2, callback=stop):
            writer.write(segment)
    assert writer.count == F and seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert list(tmp_path.iterdir()) == []  # nothing at out, no staging folder


@pytest.mark.slow
def test_sigint_in_a_later_segment_leaves_nothing_at_out(tiny_dir, identity_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = start(
        [sys.executable, "-m", "consisid_core", "generate", "--model", str(tiny_dir), "--identity", str(identity_file),
         "--prompt", "a woman smiling", "--segments", "3", "--steps", "100",
         "--out", str(out / "frames")],
        stderr=subprocess.PIPE, text=True,
    )

    def first_segment_written() -> bool:  # its frames are in the staging folder beside --out
        return any(len(list(p.glob("frame_*.png"))) >= F for p in out.glob(".frames.*"))

    _, err = signal_when(process, first_segment_written, signal.SIGINT, "segment 1 written")
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == "cancelled: nothing was written"
    assert list(out.iterdir()) == []


def test_colour_reference_moves_mean_and_spread_per_channel():
    g = torch.Generator().manual_seed(0)
    first = torch.rand(4, 16, 24, 3, generator=g) * 0.5 + 0.25
    drifted = (first * torch.tensor([1.1, 0.9, 0.8]) + 0.05).clamp(0, 1)
    reference = ColourReference.of(first)
    matched = reference.match(drifted)
    assert matched.shape == drifted.shape and matched.dtype == torch.float32
    again = ColourReference.of(matched)
    assert np.allclose(again.mean, reference.mean, atol=0.5) and np.allclose(again.std, reference.std, rtol=0.02)  # (gamut clipping)
    before = ColourReference.of(drifted)
    assert np.abs(before.mean - reference.mean).max() > 1  # (the drift was there to remove)
    assert (reference.match(first) - first).abs().max() <= 2e-3  # its own colour: unchanged (OpenCV's round trip)
    flat = torch.full((2, 8, 8, 3), 0.5)
    assert torch.isfinite(reference.match(flat)).all()  # no spread to scale: only shifted


@pytest.mark.slow
def test_colour_matching_leaves_segment_1_and_changes_the_later_ones(tiny_model, identity, text):
    plain = list(generate_segments(tiny_model, identity, [text] * 2, seed=3, steps=2))
    matched = list(generate_segments(tiny_model, identity, [text] * 2, seed=3, steps=2, colour_match=True))
    assert torch.equal(plain[0], matched[0])
    assert not torch.equal(plain[1], matched[1])


def _nodes():
    from workflow_tools import import_pack

    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS


@pytest.mark.slow
def test_chained_extend_nodes_give_the_command_lines_frames(home, tiny_dir, identity_file, tmp_path):
    """Sampler (seed 42) → VAE Decode → Extend (43) → Extend (44), colour matching on, as the workflow
    chains them, against `generate --segments 3 --seed 42 --colour-match`."""
    assert main(["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "a man walking",
                 "--negative-prompt", "blurry", "--steps", "2", "--seed", "42", "--segments", "3", "--colour-match",
                 "--out", str(tmp_path / "cli")]) == 0
    n = _nodes()
    identity = load_identity(identity_file)
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    (text,) = n["ConsisIDTextEncode"]().encode("a man walking", "blurry", model=model)
    (latent,) = n["ConsisIDSampler"]().sample(model, identity, text, 42, 2, 6.0, False, "dpm", F, 96, 64, 1.0)
    (video,) = n["ConsisIDVAEDecode"]().decode(model, latent, False, 240, 360, 40, False, 72)
    extend = n["ConsisIDExtend"]()
    for seed in (43, 44):
        new, longer = extend.extend(model, identity, text, video, seed, 2, 6.0, False, "dpm", F, 96, 64, 1.0, True)
        assert len(new) == F - 1 and torch.equal(longer, torch.cat([video, new]))
        video = longer
    assert len(video) == 3 * F - 2
    assert np.array_equal(to_uint8(video), _png_frames(tmp_path / "cli"))


def test_extend_refuses_previous_frames_it_cannot_continue(home, tiny_model, identity, text):
    extend = _nodes()["ConsisIDExtend"]  # (the pack's own ConsisIDError class, a ValueError)
    run = extend().extend
    with pytest.raises(ValueError, match="the previous frames are 192×128, this segment is 96×64: every segment"):
        run(tiny_model, identity, text, torch.rand(9, 128, 192, 3), 43, 1, 6.0, False, "dpm", F, 96, 64, 1.0, False)
    with pytest.raises(ValueError, match=r"the previous frames \(float32 \[0, 64, 96, 3\]\) is not an IMAGE"):
        run(tiny_model, identity, text, torch.rand(0, 64, 96, 3), 43, 1, 6.0, False, "dpm", F, 96, 64, 1.0, False)
    with pytest.raises(ValueError, match="segments of 1 frame add nothing"):
        run(tiny_model, identity, text, torch.rand(9, 64, 96, 3), 43, 1, 6.0, False, "dpm", 1, 96, 64, 1.0, False)
    assert "length 1 must be a whole number from 5" in extend.VALIDATE_INPUTS(length=1, width=96, height=64)
    assert "length 10 must be 4·k + 1" in extend.VALIDATE_INPUTS(length=10, width=96, height=64)


def test_a_seed_out_of_range_is_refused_not_wrapped(tiny_model, identity, text):
    with pytest.raises(ConsisIDError, match="seed -1 must be a whole number from 0"):
        next(generate_segments(tiny_model, identity, [text] * 2, seed=-1, steps=1))


@pytest.mark.slow
def test_the_segment_memory_bench_runs(tmp_path):
    out = tmp_path / "RESULTS.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench.segments", "--size", "tiny", "--segments", "1,2", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:4] for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(int(n), int(frames)) for n, frames, _ in rows[1:]] == [(1, F), (2, 2 * F - 1)]
    assert all(float(peak.replace(",", "")) > 0 for _, _, peak in rows[1:])
    assert "<!-- bench:segments-memory -->" in out.read_text()


def test_the_transformer_is_let_go_before_the_last_segments_decode(tiny_dir, identity, text):
    """As a one-pass run: the generator holds the only reference, and drops it after the last sampling."""
    import gc
    import weakref

    from consisid_core.checkpoint import Checkpoint

    model = Checkpoint.open(tiny_dir).load_model("fp32")
    transformer = weakref.ref(model.transformer)
    segments = generate_segments(model, identity, [text] * 2, steps=1)
    del model
    next(segments)
    gc.collect()
    assert transformer() is not None  # segment 2 still needs it
    next(segments)
    gc.collect()
    assert transformer() is None
