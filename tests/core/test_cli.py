"""`python -m consisid_core`: the commands, and bad arguments that exit 2 writing nothing."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main
from consisid_core.media import to_uint8
from consisid_core.sampling import generate


def test_make_tiny_command(tmp_path):
    assert main(["make-tiny", str(tmp_path / "t"), "--seed", "3", "--kps"]) == 0
    assert Checkpoint.open(tmp_path / "t").transformer_config["is_kps"] is True


@pytest.mark.slow
def test_generate_png_frames_are_the_lossless_frames(tiny_dir, tiny_model, identity_file, tmp_path):
    out = tmp_path / "frames"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "a man walking"]
    assert main(args + ["--steps", "2", "--seed", "7", "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(9)]
    from consisid_core.identity import load_identity

    expected = to_uint8(generate(tiny_model, load_identity(identity_file), "a man walking", steps=2, seed=7))
    written = np.stack([np.asarray(Image.open(f)) for f in files])
    assert np.array_equal(written, expected)


@pytest.mark.slow
def test_generate_takes_the_samplers_scheduler_and_identity_strength(tiny_dir, tiny_model, identity_file, tmp_path):
    out = tmp_path / "frames"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "a man walking"]
    assert main(args + ["--steps", "2", "--scheduler", "ddim", "--identity-strength", "0.5", "--out", str(out)]) == 0
    from consisid_core.identity import load_identity

    expected = to_uint8(generate(tiny_model, load_identity(identity_file), "a man walking", steps=2,
                                 scheduler="ddim", identity_strength=0.5))
    plain = to_uint8(generate(tiny_model, load_identity(identity_file), "a man walking", steps=2))
    written = np.stack([np.asarray(Image.open(f)) for f in sorted(out.iterdir())])
    assert np.array_equal(written, expected) and not np.array_equal(written, plain)


@pytest.mark.slow
def test_generate_mp4(tiny_dir, identity_file, tmp_path):
    out = tmp_path / "video.mp4"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "a man walking"]
    assert main(args + ["--steps", "2", "--fps", "8", "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.average_rate == 8
    assert len(frames) == 9
    assert (frames[0].width, frames[0].height) == (96, 64)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_readme_demo_runs_as_a_module(tmp_path):
    """The README's demo command, run as a module in a process of its own (fewer steps): an H.264
    .mp4 of the tiny checkpoint's trained 9 frames at 96×64, moving, with its path on stdout."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    demo = '-m consisid_core generate --model tiny --prompt "a woman smiling in a sunny park" --steps 20 --out demo.mp4'
    assert demo in readme
    out = tmp_path / "demo.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "consisid_core", "generate", "--model", "tiny", "--prompt",
         "a woman smiling in a sunny park", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert frames.shape == (9, 64, 96, 3)
    assert np.abs(np.diff(frames.astype(int), axis=0)).mean() > 1  # frames that differ: a video, not a still
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.mp4"]


@pytest.mark.slow
def test_results_go_to_stdout_and_logs_to_stderr(tiny_dir, photo, tmp_path, capfd):
    """Each command's result on stdout, so that it can be piped (embed and generate: the path
    written; score: the figure, or with `--json -` the JSON alone); logs and progress on stderr.
    Watched at the file descriptors, where native code writes too; the last in a process of its own,
    whose stdout is a pipe."""
    import json

    def run(*args: str) -> tuple[str, str]:
        assert main(list(args)) == 0
        return capfd.readouterr()

    identity = tmp_path / "me.safetensors"
    out, err = run("embed", "--model", str(tiny_dir), "--face", str(photo), "--out", str(identity))
    assert out == f"{identity}\n" and f"wrote {identity}" in err
    video = tmp_path / "v.mp4"
    out, err = run("generate", "--model", str(tiny_dir), "--identity", str(identity), "--prompt", "x", "--steps", "1",
                   "--out", str(video))
    assert out == f"{video}\n" and f"wrote 9 frames to {video}" in err and "step" in err
    common = ["score", "--model", str(tiny_dir), "--identity", str(identity), "--video", str(video)]
    out, err = run(*common)
    figure = out.strip()
    assert out == f"{figure}\n" and f"FaceSim-Arc {figure} (mean of" in err
    as_json = subprocess.run([sys.executable, "-m", "consisid_core", *common, "--json", "-"], capture_output=True,
                             text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert f"{report['facesim_arc']:.4f}" == figure and report["video_frames"] == 9
    assert len(report["frames"]) == 16 and "FaceSim-Arc" in as_json.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut.png", "me.safetensors", "v.mp4"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--length", "10"], "frame count 10 does not fit this checkpoint"),
        (["--height", "100"], "height 100 does not fit this checkpoint: it must be a positive multiple of 16"),
        (["--width", "90"], "width 90 does not fit"),
        (["--steps", "0"], "--steps 0 must be a whole number from 1 to 1000"),
        (["--fps", "0"], "--fps 0 must be a whole number from 1 to 240"),
        (["--start-image", "missing.png"], "image 'missing.png' does not exist"),
        (["--attention", "sage", "--device", "cpu"], "attention 'sage' "),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(
    tiny_dir, identity_file, tmp_path, capsys, extra, message
):
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--out", str(out)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


def test_missing_and_unreadable_files(tiny_dir, identity_file, tmp_path, capsys):
    base = ["generate", "--prompt", "x"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"junk")
    cases = [
        (["--model", str(tmp_path / "nowhere"), "--identity", str(identity_file)], "does not exist; expected a folder"),
        (["--model", str(tiny_dir), "--identity", str(tmp_path / "nobody.safetensors")], "does not exist; make one"),
        (["--model", str(tiny_dir), "--identity", str(garbage)], "is not a readable .safetensors identity file"),
        (["--model", str(tiny_dir), "--face", str(garbage)], "is not a readable image"),
    ]
    for args, message in cases:
        out = tmp_path / "frames"
        assert main(base + args + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
        assert not out.exists()


def test_output_folder_must_exist(tiny_dir, identity_file, tmp_path, capsys):
    out = tmp_path / "no" / "video.mp4"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x"]
    assert main(args + ["--out", str(out)]) == 2
    assert "its folder" in capsys.readouterr().err
    assert not out.parent.exists()


def test_identity_needed_for_a_real_checkpoint(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "give the person as --face PHOTO or --identity FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_embed_then_generate_identity_equals_generate_face(tiny_dir, photo, tmp_path):
    identity = tmp_path / "astronaut.safetensors"
    assert main(["embed", "--model", str(tiny_dir), "--face", str(photo), "--out", str(identity)]) == 0
    common = ["generate", "--model", str(tiny_dir), "--prompt", "an astronaut smiling", "--steps", "2"]
    assert main(common + ["--identity", str(identity), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--face", str(photo), "--out", str(tmp_path / "b")]) == 0
    a = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a").iterdir())]
    b = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "b").iterdir())]
    assert len(a) == 9 and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_embed_without_a_face_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys):
    dark = tmp_path / "dark.png"
    Image.new("RGB", (200, 160), (10, 10, 10)).save(dark)
    out = tmp_path / "id.safetensors"
    assert main(["embed", "--model", str(tiny_dir), "--face", str(dark), "--out", str(out)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: no face found in dark.png") and "frontal" in last
    assert not out.exists()


def test_embed_needs_a_safetensors_path(tiny_dir, photo, tmp_path, capsys):
    out = tmp_path / "id.pt"
    assert main(["embed", "--model", str(tiny_dir), "--face", str(photo), "--out", str(out)]) == 2
    assert "must be a path ending in .safetensors" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_performance_flags(tiny_dir, identity_file, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--steps", "3"]
    out = tmp_path / "fast"
    assert main(args + ["--fp8", "--offload", "sequential", "--step-cache", "0.2", "--vae-tiling", "--out", str(out)]) == 0
    assert len(list(out.iterdir())) == 9
    assert main(args + ["--step-cache", "-1", "--out", str(tmp_path / "no")]) == 2
    assert "step cache threshold -1.0" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
