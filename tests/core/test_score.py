"""FaceSim-Arc against a direct implementation of ConsisID's `eval/get_facesim_fid.py` protocol.

The reference below is that script's arc-score path, written here over insightface's own
`FaceAnalysis` (det_size 320) and OpenCV's video reader, on the tiny checkpoint's antelopev2 files.
The tiny detector is hand-set (consisid_core/face/tiny.py): a pixel on the detector's 32-pixel
grid brighter than grey 160 is a face, so frames get a face, no face, two faces, or a face that
only the padded second search finds, by where bright squares sit.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from consisid_core.checkpoint import Checkpoint
from consisid_core.cli import main
from consisid_core.errors import ConsisIDError, IdentityError
from consisid_core.face import extract_identity, load_face_models
from consisid_core.identity import save_identity
from consisid_core.media import read_video, write_frames
from consisid_core.score import (
    SampledFrames,
    identity_embedding,
    photo_embedding,
    plot,
    sample_indices,
    score_frames,
    score_video,
    segment_bounds,
    segment_indices,
    segment_starts,
)
from consisid_core.tiny import random_identity
from workflow_tools import import_pack

SIZE = 320
OTHER_CHECKPOINT = {"LFE_id_dim": 1280, "LFE_vit_dim": 16, "LFE_num_scale": 5}
"""The identity widths of a checkpoint with the real face models (1280 = 512 + 768)."""


# ----------------------------------------------------------------------------------------------
# the official protocol, directly


def official_arc_score(face_dir, image_rgb: np.ndarray | None, frames_bgr: list[np.ndarray], image_embedding=None):
    """get_facesim_fid.py's arc score: FaceAnalysis(det_size=(320, 320)), the largest face, a 1.25
    grey padding when none is found, cosine clipped at 0, frames without a face skipped."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(face_dir / "models" / "antelopev2"), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(320, 320))

    def largest(image_bgr):
        info = app.get(image_bgr)
        if len(info) > 0:
            return sorted(info, key=lambda x: (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1]))[-1]
        return None

    def process_image(np_rgb):
        image_bgr = cv2.cvtColor(np_rgb, cv2.COLOR_RGB2BGR)
        info = largest(image_bgr)
        if info is None:
            h, w = image_bgr.shape[:2]
            padded = cv2.copyMakeBorder(image_bgr, int(h * 0.25), int(h * 0.25), int(w * 0.25), int(w * 0.25),
                                        cv2.BORDER_CONSTANT, value=(128, 128, 128))
            info = largest(padded)
            if info is None:
                return None
        return info["embedding"]

    if image_embedding is None:
        image_embedding = process_image(image_rgb)
    scores = []
    for frame in frames_bgr:
        embedding = process_image(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if embedding is None:
            scores.append(None)
            continue
        similarity = torch.nn.functional.cosine_similarity(
            torch.tensor(image_embedding), torch.tensor(embedding), dim=-1)
        scores.append(max(0.0, similarity.item()))
    faced = [s for s in scores if s is not None]
    return (np.mean(faced) if faced else 0.0), scores


def official_frames(video_path, num_frames=16) -> list[np.ndarray]:
    """get_facesim_fid.py's `sample_video_frames`."""
    cap = cv2.VideoCapture(str(video_path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for idx in np.linspace(0, total - 1, num_frames, dtype=int):
        cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
        ok, frame = cap.read()
        if ok:
            frames.append(frame)
    cap.release()
    return frames


# ----------------------------------------------------------------------------------------------
# frames with known faces


def frame(seed: int, faces=(), spots=()) -> np.ndarray:
    """Dark noise (never a face) with bright textured squares over grid points (faces) and small
    bright spots between them."""
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 110, (SIZE, SIZE, 3)).astype(np.uint8)
    for (x, y), half in faces:
        im[y - half : y + half, x - half : x + half] = rng.integers(200, 256, (2 * half, 2 * half, 3))
    for x, y in spots:
        im[y - 4 : y + 4, x - 4 : x + 4] = 250
    return im


ONE = (((160, 160), 16),)
TWO = (((96, 96), 16), ((224, 224), 16))
PADDED_ONLY = dict(spots=[(112, 112)])
"""Between grid points (96, 128) in the frame; on the grid point 128 of the padded search (the
frame grows by 80 pixels a side and is scaled by 2/3: (112 + 80) · 2/3 = 128)."""


def video_frames(count: int = 20) -> np.ndarray:
    kinds = [dict(faces=ONE), dict(faces=TWO), dict(), PADDED_ONLY]
    return np.stack([frame(i, **kinds[i % 4]) for i in range(count)])


@pytest.fixture(scope="module")
def face_dir(tiny_dir):
    return Checkpoint.open(tiny_dir).face_encoder_dir


@pytest.fixture(scope="module")
def models(face_dir):
    return load_face_models(face_dir)


@pytest.fixture(scope="module")
def photo():
    return frame(99, faces=(((160, 128), 16),))


@pytest.fixture(scope="module")
def photo_identity(models, photo):
    return extract_identity(models, photo).identity


# ----------------------------------------------------------------------------------------------
# the designed frames behave as designed


def test_frames_have_the_designed_faces(models):
    from consisid_core.score import face_embedding

    bgr = lambda im: np.ascontiguousarray(im[:, :, ::-1])  # noqa: E731
    detect = lambda im: models.detector.detect(bgr(im), input_size=(320, 320), max_num=0)[0].shape[0]  # noqa: E731
    assert detect(frame(0, faces=ONE)) == 1 and detect(frame(1, faces=TWO)) == 2
    assert detect(frame(2)) == 0 and face_embedding(models, frame(2)) is None
    assert detect(frame(3, **PADDED_ONLY)) == 0 and face_embedding(models, frame(3, **PADDED_ONLY)) is not None


def test_sampling_is_the_official_linspace():
    assert sample_indices(49, 16) == [0, 3, 6, 9, 12, 16, 19, 22, 25, 28, 32, 35, 38, 41, 44, 48]
    assert sample_indices(9, 16) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 8]  # short: frames twice
    assert sample_indices(145, 1) == [0]


# ----------------------------------------------------------------------------------------------
# the score equals the official protocol


@pytest.mark.slow
def test_score_of_an_mp4_equals_the_official_script(models, face_dir, photo, tmp_path):
    pixels = video_frames(20)
    video = tmp_path / "clip.mp4"
    write_frames(torch.from_numpy(pixels).float() / 255, video, fps=8)
    read = read_video(video, lambda count: sample_indices(count, 16))
    assert read.count == 20 and read.indices == tuple(sample_indices(20, 16))
    ours = score_frames(models, photo_embedding(models, photo, "photo"), read.frames, read.indices, read.count)
    mean, scores = official_arc_score(face_dir, photo, official_frames(video))
    assert [f.score is None for f in ours.frames] == [s is None for s in scores]
    np.testing.assert_allclose([f.score for f in ours.frames if f.score is not None],
                               [s for s in scores if s is not None], rtol=0, atol=1e-6)
    assert abs(ours.mean - mean) <= 1e-6
    assert ours.without_face and len(ours.without_face) < 16  # the no-face frames were skipped, not zeros
    faced = [f.score for f in ours.frames if f.score is not None]
    assert abs(ours.mean - float(np.mean(faced))) < 1e-12 and ours.mean > 0


@pytest.mark.slow
def test_score_of_a_frames_folder_and_of_frames_in_memory_equal_the_official(models, face_dir, photo_identity,
                                                                             tmp_path):
    pixels = video_frames(9)  # shorter than 16: frames counted twice, as the official sampling does
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(pixels):
        Image.fromarray(im).save(folder / f"f_{i}.png")  # natural order: f_2 before f_10
    identity = photo_identity
    reference = identity_embedding(identity, models)
    read = read_video(folder, lambda count: sample_indices(count, 16))
    from_folder = score_frames(models, reference, read.frames, read.indices, read.count)
    in_memory = score_video(models, reference, torch.from_numpy(pixels).float() / 255, 16)
    official_bgr = [np.ascontiguousarray(pixels[i][:, :, ::-1]) for i in sample_indices(9, 16)]
    mean, scores = official_arc_score(face_dir, None, official_bgr, image_embedding=identity.id_cond[0, :512].numpy())
    for result in (from_folder, in_memory):
        assert [f.index for f in result.frames] == sample_indices(9, 16)
        assert [f.score is None for f in result.frames] == [s is None for s in scores]
        np.testing.assert_allclose([f.score for f in result.frames if f.score is not None],
                                   [s for s in scores if s is not None], rtol=0, atol=1e-6)
        assert abs(result.mean - mean) <= 1e-6


def test_a_video_without_any_face_scores_zero(models, photo):
    dark = np.stack([frame(i) for i in range(5)])
    result = score_video(models, photo_embedding(models, photo, "photo"), dark, 16)
    assert result.mean == 0.0 and [f.score for f in result.frames] == [None] * 16
    assert result.without_face == [0, 1, 2, 3, 4]
    assert result.summary() == (
        "FaceSim-Arc 0.0000 (mean of 0 of 16 sampled frames of 5; no face in frames 0, 1, 2, 3, 4)"
    )
    assert result.per_frame().splitlines()[0] == "frame 0: no face"


def test_sampled_frames_of_a_streamed_long_video_score_each_segment_and_the_whole(models, photo):
    reference = photo_embedding(models, photo, "photo")
    pixels = video_frames(17)  # two segments of 9 frames sharing frame 8
    frames = torch.from_numpy(pixels).float() / 255
    kept = SampledFrames.of_segments(2, 9, 4)
    kept.add(frames[:9])
    kept.add(frames[9:])  # the second segment's new frames, as generate writes them
    assert len(kept._kept) == len({0, 2, 5, 8, 10, 13, 16} | set(sample_indices(17, 4)))  # only what is sampled
    (first, second), whole = kept.scores(models, reference)
    assert first == score_video(models, reference, frames[:9], 4)
    assert second == score_video(models, reference, frames[8:], 4)
    assert whole == score_video(models, reference, frames, 4)
    assert segment_starts(145, 49) == [48, 96] and segment_starts(17, 9) == [8] and segment_starts(49, 0) == []


def test_segments_of_a_long_video_and_the_frames_that_score_each():
    assert segment_bounds(17, 9) == [(0, 8), (8, 16)]
    assert segment_bounds(20, 9) == [(0, 8), (8, 16), (16, 19)]  # the last segment shorter
    assert segment_bounds(49, 0) == segment_bounds(49, 49) == [(0, 48)]
    # each segment sampled as a video of its own, at its positions in the whole video
    assert segment_indices(17, 9, 4) == [[0, 2, 5, 8], [8, 10, 13, 16]]
    assert segment_indices(20, 9, 4) == [[0, 2, 5, 8], [8, 10, 13, 16], [16, 17, 18, 19]]


def test_identity_of_other_face_models_is_refused(models):
    real = random_identity(OTHER_CHECKPOINT)
    with pytest.raises(IdentityError, match="id_cond is 1280 wide, these face models make 544"):
        identity_embedding(real, models)


def test_plot_marks_scores_no_face_and_segment_starts(models, photo):
    result = score_video(models, photo_embedding(models, photo, "photo"), video_frames(17), 8)
    image = np.asarray(plot(result, segment_starts(17, 9)))
    assert image.shape == (256, 512, 3) and image.dtype == np.uint8
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    assert red.any() == bool(result.without_face)
    assert not np.array_equal(image, np.asarray(plot(result)))  # the segment start is drawn


# ----------------------------------------------------------------------------------------------
# reading videos


def test_read_video_reads_only_what_it_is_asked_and_refuses_bad_input(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((16, 24, 3), i * 10, np.uint8)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("ignored")
    video = read_video(folder, lambda count: [0, 11, 2])
    assert video.count == 12 and video.indices == (0, 11, 2)
    assert [int(f[0, 0, 0]) for f in video.frames] == [0, 110, 20]  # natural order, not frame_10 < frame_2
    with pytest.raises(ConsisIDError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConsisIDError, match="holds no PNG frames"):
        read_video(tmp_path / "empty")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    with pytest.raises(ConsisIDError, match="is not a readable video"):
        read_video(tmp_path / "junk.mp4")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(folder / "frame_5b.png")
    with pytest.raises(ConsisIDError, match=r"frame 'frame_5b.png' is 20×16 but the first frame is 24×16"):
        read_video(folder)
    (folder / "frame_5b.png").write_bytes(b"broken")
    with pytest.raises(ConsisIDError, match="frame_5b.png' is not a readable PNG frame"):
        read_video(folder)


def test_read_video_bounds_the_work_before_decoding(tmp_path, monkeypatch):
    from consisid_core import media

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(folder / f"frame_{i}.png")
    write_frames(torch.zeros(5, 16, 32, 3), tmp_path / "clip.mp4")
    monkeypatch.setattr(media, "MAX_KEPT_BYTES", 3 * 16 * 24 * 3)
    with pytest.raises(ConsisIDError, match="reading 4 frames of 24×16 .* at most"):
        read_video(folder, lambda count: [0, 1, 2, 3, 3])
    assert len(read_video(folder, lambda count: [0, 4, 4]).frames) == 3
    monkeypatch.setattr(media, "MAX_VIDEO_FRAMES", 4)
    for path in (folder, tmp_path / "clip.mp4"):
        with pytest.raises(ConsisIDError, match="has 5 frames; videos are read up to 4"):
            read_video(path, lambda count: [0])


def test_read_video_refuses_a_size_change_inside_a_video_file(tmp_path):
    import av

    def h264(size, count):
        path = tmp_path / f"{size[0]}.h264"
        with av.open(str(path), "w", format="h264") as out:
            stream = out.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
            for _ in range(count):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((size[1], size[0], 3), np.uint8), "rgb24")))
            out.mux(stream.encode())
        return path.read_bytes()

    joined = tmp_path / "joined.h264"
    joined.write_bytes(h264((32, 16), 3) + h264((48, 16), 3))
    assert read_video(joined, lambda count: [0, 1]).indices == (0, 1)  # the first part reads
    with pytest.raises(ConsisIDError, match=r"frame 3 is 48×16 but the first frame is 32×16"):
        read_video(joined)


# ----------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def scored_video(tmp_path):
    path = tmp_path / "video.mp4"
    write_frames(torch.from_numpy(video_frames(20)).float() / 255, path, fps=8)
    return path


@pytest.mark.slow
def test_score_command(tiny_dir, face_dir, models, photo, scored_video, tmp_path, caplog):
    Image.fromarray(photo).save(tmp_path / "me.png")
    out = tmp_path / "score.json"
    args = ["score", "--model", str(tiny_dir), "--face", str(tmp_path / "me.png"), "--video", str(scored_video)]
    with caplog.at_level(logging.INFO, logger="consisid_core"):
        assert main(args + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    mean, scores = official_arc_score(face_dir, photo, official_frames(scored_video))
    assert abs(report["facesim_arc"] - mean) <= 1e-6
    assert [f["score"] is None for f in report["frames"]] == [s is None for s in scores]
    assert [f["frame"] for f in report["frames"]] == sample_indices(20, 16) and report["video_frames"] == 20
    assert report["no_face"] == sorted({f["frame"] for f in report["frames"] if f["score"] is None})
    assert f"FaceSim-Arc {mean:.4f} (mean of" in caplog.text and "frame 19: " in caplog.text
    assert main(args + ["--json", str(out)]) == 2  # never replaced unless asked
    assert main(args + ["--json", str(out), "--overwrite", "--frames-sampled", "4"]) == 0
    assert [f["frame"] for f in json.loads(out.read_text())["frames"]] == [0, 6, 12, 19]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.png", "score.json", "video.mp4"]


@pytest.mark.slow
def test_score_command_with_an_identity_file(tiny_dir, models, photo_identity, scored_video, tmp_path, caplog):
    identity = save_identity(photo_identity, tmp_path / "me.safetensors")
    with caplog.at_level(logging.INFO, logger="consisid_core"):
        assert main(["score", "--model", str(tiny_dir), "--identity", str(identity), "--video", str(scored_video)]) == 0
    read = read_video(scored_video, lambda count: sample_indices(count, 16))
    expected = score_frames(models, identity_embedding(photo_identity, models), read.frames, read.indices, read.count)
    assert f"{expected.summary()}" in caplog.text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--face", "face.png", "--video", "junk.mp4"], "junk.mp4' is not a readable video"),
        (["--face", "face.png", "--video", "missing.mp4"], "missing.mp4' does not exist"),
        (["--face", "face.png", "--video", "sizes"], "frame 'frame_1.png' is 48×32 but the first frame is 32×32"),
        (["--identity", "other.safetensors", "--video", "video.mp4"],
         "other.safetensors' does not fit this checkpoint: it has id_cond of width 1280"),
        (["--face", "dark.png", "--video", "video.mp4"], "no face found in"),
        (["--face", "face.png", "--video", "video.mp4", "--frames-sampled", "0"],
         "--frames-sampled 0 must be a whole number from 1 to 1024"),
        (["--face", "face.png", "--video", "video.mp4", "--json", "out.txt"], "must be a path ending in .json"),
    ],
)
def test_score_command_refuses_bad_input_writing_nothing(tiny_dir, scored_video, photo, tmp_path, capsys, args,
                                                         message):
    save_identity(random_identity(OTHER_CHECKPOINT), tmp_path / "other.safetensors")
    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "sizes" / "frame_0.png")
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "sizes" / "frame_1.png")
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 50)
    Image.fromarray(frame(5)).save(tmp_path / "dark.png")
    Image.fromarray(photo).save(tmp_path / "face.png")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    paths = [str(tmp_path / a) if i and args[i - 1] in ("--face", "--identity", "--video", "--json") else a
             for i, a in enumerate(args)]
    assert main(["score", "--model", str(tiny_dir), "--json", str(tmp_path / "out.json"), *paths]) == 2
    *logged, last = capsys.readouterr().err.strip().splitlines()
    assert last.startswith("error: ") and message in last
    assert all(line.startswith("INFO ") for line in logged)  # a photo without a face is known once models load
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------------------------
# the node


@pytest.mark.slow
def test_identity_score_node(models, photo_identity):
    import_pack()
    from consisid_pack.consisid_core.errors import ConsisIDError, IdentityError  # the pack's own classes
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["ConsisIDIdentityScore"]()
    identity = photo_identity
    frames = torch.from_numpy(video_frames(17)).float() / 255
    shown = node.score(frames, models, identity, 8, 9)
    mean, text, picture = shown["result"]
    assert shown["ui"]["text"] == [text]  # shown on the node
    expected = score_video(models, identity_embedding(identity, models), frames, 8)
    assert isinstance(mean, float) and mean == expected.mean
    lines = text.splitlines()
    assert lines[0] == expected.summary()
    reference = identity_embedding(identity, models)
    # a segment's score is the core's: the segment scored as a video of its own, as generate --score gives it
    assert lines[1] == f"segment 1 (frames 0-8): {score_video(models, reference, frames[:9], 8).summary()}"
    assert lines[2] == f"segment 2 (frames 8-16): {score_video(models, reference, frames[8:], 8).summary()}"
    assert lines[3:] == expected.per_frame().splitlines()
    assert picture.shape == (1, 256, 512, 3) and picture.dtype == torch.float32
    assert 0 <= picture.min() <= picture.max() <= 1
    plain = node.score(frames, models, identity, 8)["result"]
    assert plain[0] == mean and "segment" not in plain[1]
    with pytest.raises(IdentityError, match="does not fit these face models"):
        node.score(frames, models, random_identity(OTHER_CHECKPOINT), 8)
    with pytest.raises(ConsisIDError, match=r"the frames input \(float32 \[0, 8, 8, 3\]\) is not an IMAGE"):
        node.score(torch.zeros(0, 8, 8, 3), models, identity, 8)
    with pytest.raises(ConsisIDError, match="NaN or infinite pixels"):
        node.score(torch.full((3, 8, 8, 3), float("nan")), models, identity, 8)


# ----------------------------------------------------------------------------------------------
# generate --score


@pytest.mark.slow
def test_generate_score_prints_each_segments_score_and_the_videos(tiny_dir, models, photo_identity, tmp_path, caplog):
    identity = save_identity(photo_identity, tmp_path / "me.safetensors")
    out = tmp_path / "frames"
    args = ["generate", "--model", str(tiny_dir), "--identity", str(identity), "--prompt", "a man walking",
            "--steps", "2", "--segments", "2", "--score", "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="consisid_core"):
        assert main(args) == 0
    written = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in sorted(out.iterdir())])).float() / 255
    assert len(written) == 17  # two segments of 9, sharing one frame
    reference = identity_embedding(photo_identity, models)
    assert f"segment 1: {score_video(models, reference, written[:9]).summary()}" in caplog.text
    assert f"segment 2: {score_video(models, reference, written[8:]).summary()}" in caplog.text
    assert f"video: {score_video(models, reference, written).summary()}" in caplog.text


def test_generate_score_needs_the_face_models_before_any_work(tiny_dir, identity, tmp_path, capsys):
    import shutil

    copy = tmp_path / "no-faces"
    shutil.copytree(tiny_dir, copy, ignore=shutil.ignore_patterns("face_encoder"))
    save_identity(identity, tmp_path / "me.safetensors")
    out = tmp_path / "video.mp4"
    args = ["generate", "--model", str(copy), "--identity", str(tmp_path / "me.safetensors"), "--prompt", "a man",
            "--steps", "2", "--score", "--out", str(out)]
    assert main(args) == 2
    assert "--score needs the checkpoint's face models" in capsys.readouterr().err
    assert not out.exists()
