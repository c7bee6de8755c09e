"""The command line, tried as a careless user and an attacker would: every bad argument exits 2 with
one line naming the value and the fix, before any weights load, writing nothing; signals clean up.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from consisid_core import cli
from consisid_core.checkpoint import Checkpoint
from consisid_core.media import write_frames
from process_tools import signal_when, start


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fails the test if a transformer is built: every case here must stop before that."""
    from diffusers import ConsisIDTransformer3DModel

    built = []
    original = ConsisIDTransformer3DModel.__init__

    def recording(self, *args, **kwargs):
        built.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ConsisIDTransformer3DModel, "__init__", recording)
    yield
    assert built == [], "the transformer was built although the arguments alone decide the refusal"


def _refused(capsys, args: list[str], message: str) -> str:
    capsys.readouterr()  # what earlier runs in the test printed
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    return err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--seed", str(2**64)], "--seed 18446744073709551616 must be a whole number from 0 to 18446744073709551615"),
        (["--seed", "-1"], "--seed -1 must be a whole number from 0"),
        (["--length", "1000001"], "frame count 1000001 is over this checkpoint's maximum of 72 per pass"),
        (["--width", "100000"], "width 100000 is over this checkpoint's maximum of 384"),
        (["--height", "1008", "--width", "96"], "height 1008 is over this checkpoint's maximum of 256"),
        (["--height", "256", "--width", "384"], "pixels per frame, over this checkpoint's maximum of 24,576"),
        (["--length", "100001", "--width", "4096", "--height", "4096", "--allow-oversize"],
         "generating 100001 frames of 4096×4096 needs about"),
        (["--steps", "1001"], "--steps 1001 must be a whole number from 1 to 1000"),
        (["--cfg", "nan"], "--cfg nan must be a finite number from 0 to 100"),
        (["--cfg", "inf"], "--cfg inf must be a finite number"),
        (["--cfg", "-3"], "--cfg -3.0 must be a finite number from 0 to 100"),
        (["--identity-strength", "11"], "--identity-strength 11.0 must be a finite number from 0 to 10"),
        (["--identity-strength", "nan"], "--identity-strength nan must be a finite number"),
        (["--fps", "100000"], "--fps 100000 must be a whole number from 1 to 240"),
        (["--step-cache", "nan"], "step cache threshold nan"),
        (["--device", "meta"], "device 'meta' is not one to run on; use auto, cpu, cuda or cuda:N"),
        (["--device", "tpu:3"], "device 'tpu:3' is not one to run on"),
        (["--device", "banana"], "device 'banana' is not one to run on"),
        (["--prompt", "x" * 100_001], "the prompt is 100,001 characters long"),
        (["--negative-prompt", "bad \udcff byte"], "the negative prompt is not valid UTF-8 text"),
    ],
)
def test_bad_arguments_are_refused_before_any_weights_load(
    tiny_dir, identity_file, tmp_path, capsys, no_weights_load, extra, message
):
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--out", str(out)]
    _refused(capsys, args + extra, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.mark.parametrize(
    "old,new,value,says",
    [
        ("--guidance", "--cfg", "nan", "--cfg nan must be a finite number"),
        ("--frames", "--length", "10", "frame count 10 does not fit this checkpoint"),
        ("--image", "--start-image", "missing.png", "image 'missing.png' does not exist"),
    ],
)
def test_an_old_option_name_sets_the_new_option_and_warns_once(
    tiny_dir, identity_file, tmp_path, capsys, no_weights_load, old, new, value, says
):
    """generate's renamed options keep their old spelling for scripts: same value, one warning naming
    the new option, and `--help` shows only the new name."""
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x",
            "--out", str(tmp_path / "out.mp4"), old, value]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count(f"{old} is now {new}; the old name still works") == 1 and says in err, err

    def parsed(option: str) -> str:
        found = vars(cli._parser().parse_args(args[:-2] + [option, value]))
        found.pop("renamed", None)
        return repr(found)

    assert parsed(old) == parsed(new)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["generate", "--help"])
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
    assert new in options and old not in options


def test_a_cuda_device_without_a_gpu(tiny_dir, identity_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x"]
    _refused(capsys, args + ["--device", "cuda:1", "--out", str(tmp_path / "v.mp4")], "torch sees no CUDA GPU")


@pytest.mark.slow
def test_a_prompt_of_bytes_that_are_not_utf8_in_a_real_process(tiny_dir, identity_file, tmp_path):
    out = tmp_path / "v.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "consisid_core", "generate", "--model", str(tiny_dir), "--identity",
         str(identity_file), "--prompt", b"a man \xff\xfe walking", "--out", str(out)],
        capture_output=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1].startswith("error: the prompt is not valid UTF-8 text")
    assert not out.exists()


@pytest.mark.parametrize("where", ["/proc/self/video.mp4", "/proc/self/frames", "/sys/video.mp4"])
def test_out_where_nothing_can_be_written(tiny_dir, identity_file, capsys, no_weights_load, where):
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--out", where]
    _refused(capsys, args, "cannot write in")


def test_out_through_a_symlink_is_refused(tiny_dir, identity_file, tmp_path, capsys, no_weights_load):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "frames"
    link.symlink_to(target, target_is_directory=True)
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x"]
    _refused(capsys, args + ["--out", str(link)], "is a symbolic link")
    mp4_link = tmp_path / "v.mp4"
    mp4_link.symlink_to(tmp_path / "nowhere.mp4")
    _refused(capsys, args + ["--out", str(mp4_link)], "is a symbolic link")
    assert list(target.iterdir()) == [] and not (tmp_path / "nowhere.mp4").exists()


@pytest.mark.slow
def test_an_existing_video_is_replaced_only_with_overwrite(tiny_dir, identity_file, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"the user's own video")
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--steps", "1"]
    _refused(capsys, args + ["--out", str(out)], "already exists; give a new name, or pass --overwrite")
    assert out.read_bytes() == b"the user's own video"
    assert cli.main(args + ["--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[4:8] == b"ftyp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors", "v.mp4"]


@pytest.mark.slow
def test_overwrite_replaces_only_a_folder_of_frames(tiny_dir, identity_file, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x", "--steps", "1"]
    frames = tmp_path / "frames"
    assert cli.main(args + ["--out", str(frames)]) == 0
    _refused(capsys, args + ["--out", str(frames)], "already exists and is not empty")
    assert cli.main(args + ["--out", str(frames), "--overwrite", "--seed", "3"]) == 0
    assert len(list(frames.iterdir())) == 9
    (frames / "notes.txt").write_text("mine")
    _refused(capsys, args + ["--out", str(frames), "--overwrite"], "already exists and is not empty")
    assert (frames / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "me.safetensors"]


def test_embed_out_onto_a_folder_or_an_existing_identity(tiny_dir, identity_file, tmp_path, capsys):
    photo = tmp_path / "face.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(photo)
    folder = tmp_path / "id.safetensors"
    folder.mkdir()
    base = ["embed", "--model", str(tiny_dir), "--face", str(photo), "--out"]
    _refused(capsys, base + [str(folder)], "a folder of that name exists")
    before = identity_file.read_bytes()
    _refused(capsys, base + [str(identity_file)], "already exists; give a new name, or pass --overwrite")
    assert identity_file.read_bytes() == before
    _refused(capsys, base + ["/proc/self/id.safetensors"], "cannot write in")


def test_make_tiny_seed_out_of_range(tmp_path, capsys):
    _refused(capsys, ["make-tiny", str(tmp_path / "t"), "--seed", "-5"], "--seed -5 must be a whole number from 0")
    assert not (tmp_path / "t").exists()


def test_a_run_out_of_memory_is_refused_before_loading(tiny_dir, identity_file, tmp_path, capsys, no_weights_load):
    """The memory estimate against what the machine has, at a size the bounds allow when asked."""
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "x",
            "--allow-oversize", "--length", "100001",
            "--height", "2048", "--width", "2048", "--out", str(tmp_path / "v.mp4")]
    err = _refused(capsys, args, "generating 100001 frames of 2048×2048 needs about")
    assert "memory available: lower the frame count or the size" in err


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "cancelled")])
def test_a_signal_mid_run_leaves_no_temporary_files_and_nothing_at_out(tmp_path, sig, code, line):
    """`--model tiny` makes its checkpoint in a temporary folder: a signal mid-run removes it."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = start(
        [sys.executable, "-m", "consisid_core", "generate", "--model", "tiny", "--prompt", "a woman smiling",
         "--steps", "1000", "--out", str(out_dir / "v.mp4")],
        env={**os.environ, "TMPDIR": str(temp)}, stderr=subprocess.PIPE, text=True,
    )

    def into_the_run() -> bool:
        if not any((p / "checkpoint").is_dir() for p in temp.glob("consisid-tiny-*")):
            return False
        time.sleep(2)  # the tiny checkpoint is there: into the run
        return True

    _, err = signal_when(process, into_the_run, sig, "the tiny checkpoint")
    assert process.returncode == code, err
    assert err.splitlines()[-1] == f"{line}: nothing was written"
    # torch keeps a compile cache: not ours (ONNX Runtime, imported with its telemetry off, writes no .ses)
    ours = [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")]
    assert ours == [] and list(out_dir.iterdir()) == []


def test_sigterm_while_frames_are_written_removes_the_staging_folder(tmp_path, monkeypatch):
    """The hidden staging folder beside --out goes too when SIGTERM comes mid-write."""
    from PIL import Image

    saved = []
    real_save = Image.Image.save

    def save_then_signal(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saved.append(True)
        if len(saved) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Image.Image, "save", save_then_signal)
    out = tmp_path / "frames"
    with pytest.raises(cli.Terminated), cli._terminating_cleanly():
        write_frames(torch.rand(9, 16, 16, 3), out)
    assert len(saved) == 3
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_checkpoint_open_alone_refuses_before_weights(tmp_path, tiny_dir):
    """`generate` refuses a bad checkpoint folder at Checkpoint.open: configs only."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "transformer" / "config.json").read_text())
    config["num_layers"] = 1_000_000_000
    (bad / "transformer" / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    with pytest.raises(ValueError, match="'num_layers' 1000000000 must be a whole number from 1 to 512"):
        Checkpoint.open(bad)
    assert time.monotonic() - started < 10
    assert Path(bad / "transformer" / "config.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "m", "--prompt", "p", "--seed", "abc", "--out", "o"], "argument --seed: invalid int value: 'abc'"),
        (["generate", "--model", "m", "--out", "o"], "the following arguments are required: --prompt"),
        (["generate", "--model", "m", "--prompt", "p", "--dtype", "fp4", "--out", "o"], "argument --dtype: invalid choice: 'fp4'"),
        (["generate", "--model", "m", "--prompt", "p", "--scheduler", "euler", "--out", "o"],
         "argument --scheduler: invalid choice: 'euler'"),
        (["paint"], "argument command: invalid choice: 'paint'"),
    ],
)
def test_malformed_command_lines_get_one_line_too(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "--help" in err


# --- ranks, signals and LoRAs: refusals in one line ---------------------------------------------


def _generate_args(tiny_dir, identity_file, *extra) -> list[str]:
    return ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "hi", "--steps", "1",
            "--length", "5", *extra]


def test_overwrite_deletes_only_plain_frame_files(tiny_dir, identity_file, tmp_path, capsys, no_weights_load, sentinels):
    """A folder or a link named like a frame is not a frame written here: --overwrite refuses the
    folder before any work, and what it holds stays, unread."""
    hidden = tmp_path / "ow" / "hidden"
    (hidden / "frame_00009.png").mkdir(parents=True)
    (hidden / "frame_00009.png" / "precious.txt").write_text("mine")
    (hidden / "frame_00000.png").write_bytes(b"an old frame")
    args = _generate_args(tiny_dir, identity_file, "--out", str(hidden), "--overwrite")
    _refused(capsys, args, "already exists and is not empty; give a new or empty folder for PNG frames (it holds more")
    assert (hidden / "frame_00009.png" / "precious.txt").read_text() == "mine"
    shutil.rmtree(hidden / "frame_00009.png")
    (hidden / "frame_00001.png").symlink_to(sentinels.make("someone-elses.png"))
    _refused(capsys, args, "it holds more than frames written here")
    assert sorted(p.name for p in hidden.iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert sorted(p.name for p in (tmp_path / "ow").iterdir()) == ["hidden"]


@pytest.mark.parametrize("frames_in_folder", [False, True], ids=["empty", "frames"])
def test_out_the_current_folder_is_refused_up_front(
    tiny_dir, identity_file, tmp_path, capsys, monkeypatch, no_weights_load, frames_in_folder
):
    """`--out .` would stage the frames inside the folder it replaces; `--out . --overwrite` in a
    folder of frames failed after the whole run with a traceback."""
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    if frames_in_folder:
        for i in range(3):
            (here / f"frame_{i:05d}.png").write_bytes(b"frame")
    monkeypatch.chdir(here)
    before = sorted(p.name for p in here.iterdir())
    for out in (".", "..", "sub/.."):
        _refused(capsys, _generate_args(tiny_dir, identity_file, "--out", out, "--overwrite"), "is the current folder")
    _refused(capsys, _generate_args(tiny_dir, identity_file, "--out", "."), "is the current folder")
    assert sorted(p.name for p in here.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "me.safetensors"]


def test_a_name_longer_than_the_file_system_takes(tiny_dir, identity_file, tmp_path, capsys, no_weights_load):
    long = tmp_path / ("n" * 300 + ".json")
    args = ["score", "--model", str(tiny_dir), "--identity", str(identity_file), "--video", str(tmp_path / "v.mp4"),
            "--json", str(long)]
    err = _refused(capsys, args, "File name too long); choose another name")
    assert len(err) < 400
    _refused(capsys, _generate_args(tiny_dir, identity_file, "--out", str(tmp_path / ("v" * 300 + ".mp4"))),
             "File name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("extra,frames", [(["--length", "5"], 8), (["--length", "13"], 16),
                                         (["--length", "5", "--segments", "2"], 15)])
def test_score_of_frame_counts_that_decode_to_more_frames(tiny_dir, identity_file, tmp_path, capsys, extra, frames):
    """An even latent frame count (5, 13 frames) decodes to more frames than asked, as in diffusers:
    --score scores the video as written, and the video is kept."""
    import av

    out = tmp_path / "x.mp4"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity_file), "--prompt", "hi", "--steps", "1",
            "--score", "--out", str(out), *extra]
    capsys.readouterr()
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert f"sampled frames of {frames}" in captured.err, captured.err
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors", "x.mp4"]


@pytest.mark.parametrize(
    "split,message",
    [
        ("ulysses=" + "9" * 5000, "parallel ulysses=99999999999999999999… must be a whole number from 1 to 4096"),
        ("ulysses=²", "--parallel 'ulysses=²' is not a split"),
        ("ulysses=2\x1b[31m", "--parallel 'ulysses=2\\x1b[31m' is not a split"),
        ("cfg=2\x07", "--parallel 'cfg=2\\x07' is not a split"),
    ],
    ids=["5000-digits", "superscript", "escape-sequence", "bell"],
)
def test_parallel_splits_of_odd_characters(tiny_dir, identity_file, tmp_path, capsys, no_weights_load, split, message):
    out = tmp_path / "v.mp4"
    err = _refused(capsys, _generate_args(tiny_dir, identity_file, "--parallel", split, "--out", str(out)), message)
    assert "\x1b" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.fixture
def rank0_of_two(monkeypatch):
    """torchrun's environment for rank 0 of 2, on a port nothing listens on (no other rank comes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_parallel_without_the_address_of_rank_0(tiny_dir, identity_file, tmp_path, capsys, monkeypatch, rank0_of_two,
                                                no_weights_load, missing):
    monkeypatch.delenv(missing)
    out = tmp_path / "v.mp4"
    err = _refused(capsys, _generate_args(tiny_dir, identity_file, "--parallel", "cfg=2", "--out", str(out)),
                   "--parallel needs one process per rank, started by torchrun")
    assert "MASTER_ADDR" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.mark.slow
def test_parallel_ranks_that_never_meet_time_out(tiny_dir, identity_file, tmp_path, rank0_of_two):
    """Rank 0 waits for a second rank `RENDEZVOUS_SECONDS` (2 here, in a process of its own: torch's
    wait stays behind in a thread until the process ends), then stops with one line."""
    out = tmp_path / "v.mp4"
    args = _generate_args(tiny_dir, identity_file, "--parallel", "cfg=2", "--out", str(out))
    code = f"from consisid_core import cli, parallel; parallel.RENDEZVOUS_SECONDS = 2; raise SystemExit(cli.main({args!r}))"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **rank0_of_two})
    assert time.monotonic() - started < 120
    assert done.returncode == 2 and done.stdout == ""
    port = rank0_of_two["MASTER_PORT"]
    assert done.stderr.splitlines()[-1] == (
        f"error: the 2 processes of --parallel did not all meet at 127.0.0.1:{port} within 2 s: start them together "
        "with torchrun --nproc-per-node 2 (× --nnodes), each with the same arguments"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_other_ranks(tiny_dir, identity_file, tmp_path, rank0_of_two):
    """SIGTERM stops the wait for the other ranks (which torch makes inside C++, where Python's
    signal handlers do not run) at once, with one line."""
    import socket

    out = tmp_path / "v.mp4"
    process = start(
        [sys.executable, "-m", "consisid_core", *_generate_args(tiny_dir, identity_file, "--parallel", "cfg=2",
                                                                "--out", str(out))],
        env={**os.environ, **rank0_of_two}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def listening() -> bool:  # rank 0 serves the rendezvous on MASTER_PORT once it waits there
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", int(rank0_of_two["MASTER_PORT"]))) == 0

    stdout, err = signal_when(process, listening, signal.SIGTERM, "rank 0 waiting for the others")
    assert process.returncode == 143, err
    assert err.splitlines()[-1] == "terminated: nothing was written" and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


def _lora(tmp_path, tiny_model, how: str) -> Path:
    """A LoRA of one layer with an absurd alpha: 1e300 in its adapter metadata (diffusers' trainers),
    or 1e7 (below the bound on any tensor's values) as a kohya-style `.alpha` tensor."""
    import json

    from safetensors.torch import save_file

    out_features, in_features = tiny_model.transformer.transformer_blocks[0].attn1.to_q.weight.shape
    key = "transformer.transformer_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": torch.randn(4, in_features), f"{key}.lora_B.weight": torch.randn(out_features, 4)}
    metadata = None
    if how == "metadata":
        config = {"transformer.r": 4, "transformer.lora_alpha": 1e300, "transformer.target_modules": ["to_q"]}
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    else:
        tensors[f"{key}.alpha"] = torch.tensor(1e7)
    path = tmp_path / f"huge-{how}.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize("how,source,scale", [("metadata", "its metadata's lora_alpha", "2.5e+299"),
                                              ("tensor", "'transformer.transformer_blocks.0.attn1.to_q.alpha'", "2.5e+06")])
def test_a_lora_alpha_that_would_overflow_the_run(tiny_dir, tiny_model, identity_file, tmp_path, capsys, how, source,
                                                  scale):
    """A LoRA alpha that would overflow the run is refused when the LoRA is read, before any weights
    load (against a transformer built on the meta device), naming the LoRA."""
    lora = _lora(tmp_path, tiny_model, how)
    out = tmp_path / "v.mp4"
    _refused(capsys, _generate_args(tiny_dir, identity_file, "--lora", str(lora), "--out", str(out)),
             f"LoRA 'huge-{how}.safetensors': {source} gives 'transformer_blocks.0.attn1.to_q' a scale of {scale} "
             "(alpha / rank), over the 1000 no trained LoRA comes near")
    assert sorted(p.name for p in tmp_path.iterdir()) == [lora.name, "me.safetensors"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_other_than_0_leaves_the_exit_to_rank_0(tiny_dir, identity_file, tmp_path, capsys, monkeypatch,
                                                       rank0_of_two, rank):
    """torchrun stops the other ranks as soon as one exits: a rank other than 0 that refuses what
    every rank refuses says nothing and stays `RANK_0_SECONDS` before it exits, for torchrun to end
    it once rank 0 has said why (so rank 0 is never stopped before its line); rank 0 says it and
    exits at once."""
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)  # the standard library's wait, recorded
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    out = tmp_path / "v.mp4"
    assert cli.main(_generate_args(tiny_dir, identity_file, "--parallel", "cfg=2", "--cfg", "1", "--out", str(out))) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert err.startswith("error: --parallel cfg=2 splits the guided batch") and slept == []
    else:
        assert err == "" and slept == [cli.RANK_0_SECONDS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["guidance", "no-face"])
def test_a_refusal_under_torchrun_is_one_line_from_rank_0(tiny_dir, identity_file, tmp_path, case):
    """Every rank refuses the same arguments (guidance 1 with cfg=2: before the ranks meet; a photo
    without a face: rank 0 finds none, the others stop with it): one line, from rank 0. torchrun's
    own report of a process that exited non-zero follows it, as for any failed worker (it cannot be
    avoided from the worker: torchrun reports every non-zero exit); `--log-dir /dev/null` keeps its
    log folder (torchelastic_* in TMPDIR, made on every run) from being left behind."""
    from PIL import Image

    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "v.mp4"
    who = ["--identity", str(identity_file), "--cfg", "1"]
    if case == "no-face":
        dark = tmp_path / "dark.png"
        Image.new("RGB", (200, 160), (10, 10, 10)).save(dark)
        who = ["--face", str(dark)]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--log-dir", os.devnull,
         "-m", "consisid_core", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--steps", "1", *who,
         "--parallel", "cfg=2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    message = {"guidance": "error: --parallel cfg=2 splits the guided batch, but guidance 1.0 (1 or less) turns",
               "no-face": "error: no face found in dark.png"}[case]
    assert len(ours) == 1 and ours[0].startswith(message), done.stderr
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # torch's compile cache is not ours, nor torchrun's (ONNX Runtime, its telemetry off, writes no .ses)
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []


# --- export: contained, checked as generate checks, all files or none (issues 28, 30) ------------


def _plain_lora(folder: Path, tiny_model, name: str = "style") -> Path:
    """A LoRA of one layer of the tiny transformer, in the diffusers layout."""
    from safetensors.torch import save_file

    out_features, in_features = tiny_model.transformer.transformer_blocks[0].attn1.to_q.weight.shape
    key = "transformer.transformer_blocks.0.attn1.to_q"
    path = folder / f"{name}.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(4, in_features) * 0.01,
               f"{key}.lora_B.weight": torch.randn(out_features, 4) * 0.01}, path)
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _everything(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _export(tiny_dir, out, *extra) -> list[str]:
    return ["export", "--model", str(tiny_dir), "--out", str(out), *extra]


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "lnk/x", "sub/x", ".", "..", ".hidden", "a\\b", "C:x", "x\n",
                                  "x\x1b[31m", "", " ", "x" * 101, "bad \udcff"])
def test_export_name_is_one_plain_file_name(tiny_dir, tmp_path, out, capsys, sentinels, name):
    """Every --name that is not one plain file name is refused before anything is read or written:
    nothing appears in --out, beside it, or where a link in it leads."""
    elsewhere = sentinels.make("elsewhere/keep.txt").parent
    (out / "lnk").symlink_to(elsewhere, target_is_directory=True)
    (out / "sub").mkdir()
    err = _refused(capsys, _export(tiny_dir, out, "--name", name), "is not a plain file name")
    assert err.startswith("error: --name '") and ".partial" not in err and "\x1b" not in err
    assert _everything(out) == ["lnk", "sub"] and _everything(elsewhere) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_names_at_the_bound_and_unicode_are_taken(tiny_dir, out, capsys):
    for name in ("x" * 100, "modèle 2 (v1)"):
        capsys.readouterr()
        assert cli.main(_export(tiny_dir, out, "--name", name)) == 0
        written = capsys.readouterr().out.split("\n")[:2]
        assert written == [str(out / f"{name}_transformer.safetensors"), str(out / f"{name}_face.safetensors")]


@pytest.mark.parametrize(
    "where,message",
    [("link", "is a symbolic link (to '"), ("file", "is not a folder"), ("devnull", "is not a folder"),
     ("missing", "does not exist"), ("proc", "cannot write in '/proc'"), ("proc-self", "is a symbolic link")],
)
def test_export_out_that_is_not_a_folder_to_write_in(tiny_dir, tmp_path, capsys, where, message):
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "link").symlink_to(other, target_is_directory=True)
    (tmp_path / "file").write_text("mine")
    out = {"link": tmp_path / "link", "file": tmp_path / "file", "devnull": Path(os.devnull),
           "missing": tmp_path / "missing" / "sub", "proc": Path("/proc"), "proc-self": Path("/proc/self")}[where]
    _refused(capsys, _export(tiny_dir, out), message)
    assert _everything(tmp_path) == ["file", "link", "other"] and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("how", ["immutable", "read-only"])
def test_export_into_a_folder_that_cannot_be_written(tiny_dir, out, capsys, how):
    """The OS's refusals (chattr +i, a folder without write permission) are refusals like any other: exit 2,
    one line, before any weights load."""
    if how == "read-only":
        out.chmod(0o555)
        if os.access(out, os.W_OK):
            out.chmod(0o755)
            pytest.skip("this user writes in read-only folders (root)")
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not allowed here")
    try:
        _refused(capsys, _export(tiny_dir, out), f"cannot write in '{out}'")
        assert _everything(out) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True) if how == "immutable" else out.chmod(0o755)


def test_export_checks_every_target_before_writing_any(tiny_dir, tiny_model, tmp_path, out, capsys, sentinels):
    """The face file there, a LoRA's target there, a link at a target: refused before the first
    byte; with --overwrite a link is still refused and what it points to untouched."""
    lora = _plain_lora(tmp_path, tiny_model)
    (out / "consisid_face.safetensors").write_bytes(b"the user's")
    _refused(capsys, _export(tiny_dir, out), "consisid_face.safetensors' already exists; give a new name, or pass")
    assert _everything(out) == ["consisid_face.safetensors"]
    (out / "consisid_face.safetensors").unlink()
    (out / "style_comfy.safetensors").write_bytes(b"the user's")
    _refused(capsys, _export(tiny_dir, out, "--lora", str(lora)), "style_comfy.safetensors' already exists")
    assert _everything(out) == ["style_comfy.safetensors"]
    (out / "style_comfy.safetensors").unlink()
    theirs = sentinels.make("theirs.safetensors")
    before = theirs.stat()
    (out / "consisid_transformer.safetensors").symlink_to(theirs)
    _refused(capsys, _export(tiny_dir, out, "--overwrite"), "is a symbolic link")
    assert _everything(out) == ["consisid_transformer.safetensors"]
    assert (theirs.stat().st_mtime_ns, theirs.stat().st_size) == (before.st_mtime_ns, before.st_size)


def test_export_a_lora_given_twice_or_two_of_one_name(tiny_dir, tiny_model, tmp_path, out, capsys):
    lora = _plain_lora(tmp_path, tiny_model)
    (tmp_path / "b").mkdir()
    other = _plain_lora(tmp_path / "b", tiny_model)
    _refused(capsys, _export(tiny_dir, out, "--lora", str(lora), "--lora", str(lora)), "is given twice")
    _refused(capsys, ["export", "--lora", str(lora), "--lora", str(other), "--out", str(out)],
             "would both be written as 'style_comfy.safetensors': give each LoRA file a name of its own")
    assert _everything(out) == []


def test_export_names_too_long_for_the_file_system(tiny_dir, tiny_model, tmp_path, out, capsys):
    """100 characters of 4 bytes each, or a LoRA's name 240 long, with the ending added: the file
    system's refusal, before anything is written."""
    _refused(capsys, _export(tiny_dir, out, "--name", "\N{GRINNING FACE}" * 100), "File name too long")
    lora = _plain_lora(tmp_path, tiny_model, "l" * 240)
    _refused(capsys, _export(tiny_dir, out, "--lora", str(lora)), "File name too long")
    assert _everything(out) == []


def test_export_writes_every_file_or_none(tiny_dir, tiny_model, tmp_path, out, capsys):
    """The model's files and each LoRA's appear together, in one command; the last of them failing
    to be moved into place takes back those before it, and a file --overwrite replaced is back."""
    from consisid_core import files

    lora = _plain_lora(tmp_path, tiny_model)
    args = _export(tiny_dir, out, "--lora", str(lora))
    assert cli.main(args) == 0
    names = ["consisid_face.safetensors", "consisid_transformer.safetensors", "style_comfy.safetensors"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in (names[1], names[0], names[2])]
    assert _everything(out) == names
    before = {n: (out / n).read_bytes() for n in names}
    real_publish = files.publish
    published = []

    def publish_twice_then_fail(staged, target, overwrite=False):
        if len(published) == 2:
            raise OSError(28, "No space left on device", str(target))
        published.append(target)
        return real_publish(staged, target, overwrite)

    files.publish = publish_twice_then_fail
    try:
        assert cli.main(args + ["--overwrite", "--dtype", "fp16"]) == 1
    finally:
        files.publish = real_publish
    assert len(published) == 2 and "No space left on device" in capsys.readouterr().err
    assert _everything(out) == names and {n: (out / n).read_bytes() for n in names} == before
    for name in names:  # a fresh export publishes all three
        (out / name).unlink()
    assert cli.main(["export", "--lora", str(lora), "--out", str(out)]) == 0 and _everything(out) == [names[2]]


def test_sigterm_while_the_files_are_moved_into_place_takes_them_all_back(tmp_path, monkeypatch):
    """SIGTERM between publishing one file and the next is held until the files are back out of
    place, then delivered: nothing is left, and the old file --overwrite replaced is back."""
    from consisid_core import files

    real_publish = files.publish
    published = []

    def publish_with_a_signal(staged, target, overwrite=False):
        published.append(real_publish(staged, target, overwrite))
        if len(published) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return published[-1]

    monkeypatch.setattr(files, "publish", publish_with_a_signal)
    (tmp_path / "b.txt").write_text("old")
    writes = {tmp_path / name: (lambda path, name=name: path.write_text(name)) for name in ("a.txt", "b.txt", "c.txt")}
    with pytest.raises(cli.Terminated), cli._terminating_cleanly():
        files.write_all(writes, overwrite=True)
    assert len(published) == 3
    assert _everything(tmp_path) == ["b.txt"] and (tmp_path / "b.txt").read_text() == "old"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _damaged_copy(tiny_dir, tmp_path, how: str) -> Path:
    """The tiny checkpoint with a transformer that `generate` refuses."""
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"damaged-{how}"
    shutil.copytree(tiny_dir, folder)
    if how == "shape":
        config_path = folder / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        config["text_embed_dim"] *= 2
        config_path.write_text(json.dumps(config))
        return folder
    (weights_path,) = (folder / "transformer").glob("*.safetensors")
    weights = load_file(weights_path)
    key = "transformer_blocks.0.attn1.to_q.weight"
    weights[key] = weights[key].to(torch.int64) if how == "integer" else torch.full_like(weights[key], float("nan"))
    save_file(weights, weights_path)
    return folder


@pytest.mark.parametrize(
    "how,message,exported",
    [("integer", "'transformer_blocks.0.attn1.to_q.weight' holds I64 values, where a model's weights are floats", None),
     ("shape", "the folder's config.json makes it", "do not match their config: keys 1 of the wrong shape"),
     ("nan", "'transformer_blocks.0.attn1.to_q.weight' holds NaN values", None)],
)
def test_export_refuses_what_generate_refuses(tiny_dir, identity_file, tmp_path, out, capsys, how, message, exported):
    damaged = _damaged_copy(tiny_dir, tmp_path, how)
    capsys.readouterr()
    assert cli.main(_generate_args(damaged, identity_file, "--out", str(tmp_path / "v.mp4"))) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]  # after the text encoder's progress
    _refused(capsys, _export(damaged, out), exported or message)
    assert _everything(out) == [] and not (tmp_path / "v.mp4").exists()


def test_export_refuses_a_single_file_with_nan_weights(tiny_dir, tmp_path, out, capsys):
    from safetensors.torch import load_file, save_file

    (weights_path,) = (_damaged_copy(tiny_dir, tmp_path, "nan") / "transformer").glob("*.safetensors")
    single = tmp_path / "single.safetensors"
    save_file(load_file(weights_path), single)
    _refused(capsys, ["export", "--model", str(single), "--out", str(out)], "holds NaN values")
    assert _everything(out) == []


def test_export_lora_that_is_a_folder(tiny_dir, tmp_path, out, capsys):
    _refused(capsys, ["export", "--lora", str(tmp_path), "--out", str(out)],
             "is a folder; give the LoRA's .safetensors file")
    assert _everything(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "cancelled")])
def test_a_signal_mid_export_leaves_nothing_and_ends_at_once(tiny_dir, tmp_path, out, sig, code, line):
    """Once the transformer's file is written whole, the face file's write is made to hang in native
    code for minutes (a PBKDF2 of 10⁹ rounds, where Python's signal handlers cannot run, as while
    safetensors writes gigabytes). The signal still ends the process at once, and the finished
    transformer file goes too."""
    marker = tmp_path / "transformer-written"
    stuck_write = (
        "import hashlib, runpy, sys\n"
        "from consisid_core import native\n"
        "def save_file(tensors, path, metadata=None):\n"
        "    native_save(tensors, path, metadata=metadata)\n"
        f"    if path.name.endswith('_transformer.safetensors'): open({str(marker)!r}, 'w').close()\n"
        "    else: hashlib.pbkdf2_hmac('sha256', b'x', b'y', 10**9)\n"
        "native_save, native.save_file = native.save_file, save_file\n"
        "runpy.run_module('consisid_core', run_name='__main__', alter_sys=True)\n"  # python -m consisid_core
    )
    process = start([sys.executable, "-c", stuck_write, *_export(tiny_dir, out)], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    sent = []

    def written() -> bool:
        if marker.exists():
            time.sleep(0.5)  # into the stuck write
            sent.append(time.monotonic())
        return bool(sent)

    stdout, err = signal_when(process, written, sig, "the transformer's file written")
    took = time.monotonic() - sent[0]
    assert process.returncode == code, err
    assert err.splitlines()[-1] == f"{line}: nothing was written" and stdout == ""
    assert _everything(out) == []
    print(f"ended {took:.2f} s after the signal")
    assert took < 5  # the stuck write alone takes minutes
