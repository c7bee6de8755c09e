"""The face pipeline on the tiny face encoder: files, loading, detection, extraction, input kinds.

The tiny detectors are hand-set (see consisid_core/face/tiny.py): a bright square on black centred on a
stride-32 grid point is one face for both detectors, whose box and keypoints are known in advance.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from consisid_core.errors import ConsisIDError, FaceError
from consisid_core.face import (
    TINY_EVA,
    extract_identities,
    extract_identity,
    load_face_models,
    resolve_providers,
    to_rgb_uint8,
    write_tiny_face_encoder,
)
from consisid_core.face.tiny import (
    CANONICAL_KPS,
    RETINA_FACE_SIZE,
    scrfd_face_size,
)


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory):
    return write_tiny_face_encoder(tmp_path_factory.mktemp("tiny") / "face_encoder", seed=0)


@pytest.fixture(scope="module")
def models(face_dir):
    return load_face_models(face_dir)


def squares(size=(640, 640), faces=(((320, 320), 250),), background=0):
    """A black (or `background` grey) RGB image with bright squares covering each grid point (x, y)
    and the RetinaFace prior centre (x+16, y+16)."""
    h, w = size
    im = np.full((h, w, 3), background, np.uint8)
    for (x, y), gray in faces:
        im[y - 8 : y + 24, x - 8 : x + 24] = gray
    return im


THREE = (((96, 320), 190), ((320, 320), 250), ((544, 320), 220))


# ----------------------------------------------------------------------------------------------
# files and loading


def test_tiny_writer_is_deterministic_and_seeded(tmp_path, face_dir):
    again = write_tiny_face_encoder(tmp_path / "a", seed=0)
    other = write_tiny_face_encoder(tmp_path / "b", seed=1)
    files = sorted(p.relative_to(face_dir) for p in face_dir.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "EVA02_CLIP_L_336_psz14_s6B.pt",
        "detection_Resnet50_Final.pth",
        "models/antelopev2/glintr100.onnx",
        "models/antelopev2/scrfd_10g_bnkps.onnx",
        "parsing_bisenet.pth",
    ]
    for f in files:
        assert (again / f).read_bytes() == (face_dir / f).read_bytes(), f
    assert (other / "EVA02_CLIP_L_336_psz14_s6B.pt").read_bytes() != (face_dir / "EVA02_CLIP_L_336_psz14_s6B.pt").read_bytes()
    assert (other / "models/antelopev2/glintr100.onnx").read_bytes() != (face_dir / "models/antelopev2/glintr100.onnx").read_bytes()
    eva = torch.load(face_dir / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True)
    assert eva["visual.head.weight"].shape == (32, 32) and "visual.blocks.23.mlp.w3.weight" in eva


def test_load_face_models_reads_sizes_from_weights(models):
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.bisenet import BiSeNet

    assert models.detector.taskname == "detection" and models.detector.use_kps
    assert models.recognizer.taskname == "recognition" and models.recognizer.input_size == (112, 112)
    assert isinstance(models.retinaface, RetinaFace) and isinstance(models.parser, BiSeNet)
    cfg = models.eva.config
    assert (cfg.width, cfg.depth, cfg.heads, cfg.embed_dim, cfg.patch_size, cfg.image_size) == (
        TINY_EVA["width"], TINY_EVA["depth"], TINY_EVA["heads"], TINY_EVA["embed_dim"], 14, 336)
    assert (models.id_dim, models.vit_dim) == (544, 32)
    assert models.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "missing", ["parsing_bisenet.pth", "detection_Resnet50_Final.pth", "EVA02_CLIP_L_336_psz14_s6B.pt",
                "models/antelopev2/glintr100.onnx", "models/antelopev2/scrfd_10g_bnkps.onnx"]
)
def test_missing_file_names_file_and_folder_and_never_downloads(tmp_path, face_dir, missing, monkeypatch):
    import facexlib.utils.misc
    import insightface.utils.storage

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(facexlib.utils.misc, "download_url_to_file", no_download)
    monkeypatch.setattr(insightface.utils.storage, "download_file", no_download)
    copy = tmp_path / "face_encoder"
    shutil.copytree(face_dir, copy)
    (copy / missing).unlink()
    with pytest.raises(FaceError) as e:
        load_face_models(copy)
    assert missing.split("/")[-1] in str(e.value) and str(copy) in str(e.value)


def test_missing_folder_and_wrong_file(tmp_path, face_dir):
    with pytest.raises(FaceError, match="does not exist"):
        load_face_models(tmp_path / "nowhere")
    copy = tmp_path / "face_encoder"
    shutil.copytree(face_dir, copy)
    shutil.copy(face_dir / "parsing_bisenet.pth", copy / "detection_Resnet50_Final.pth")
    with pytest.raises(FaceError, match="not a facexlib RetinaFace checkpoint"):
        load_face_models(copy)


def test_providers():
    import onnxruntime

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    with pytest.raises(FaceError) as e:
        resolve_providers("nonsense")
    assert "'nonsense'" in str(e.value) and "cpu" in str(e.value)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(FaceError, match="onnxruntime-gpu"):
            resolve_providers("cuda")
    else:
        assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ----------------------------------------------------------------------------------------------
# the hand-set detectors through the real decoding code


def test_scrfd_decoding_gives_the_designed_faces(models):
    bgr = np.ascontiguousarray(squares(faces=THREE)[:, :, ::-1])
    det, kps = models.detector.detect(bgr, max_num=0, metric="default")  # insightface's SCRFD decoding
    assert det.shape == (3, 5) and kps.shape == (3, 5, 2)
    order = np.argsort(det[:, 0])
    for (centre, gray), box, points in zip(THREE, det[order], kps[order]):
        s = scrfd_face_size(gray)
        expected = [centre[0] - s / 2, centre[1] - s / 2, centre[0] + s / 2, centre[1] + s / 2]
        np.testing.assert_allclose(box[:4], expected, atol=1.5)
        np.testing.assert_allclose(points, np.array(centre) + CANONICAL_KPS * s, atol=1.5)
        assert box[4] > 0.5


@pytest.mark.slow
def test_retinaface_decoding_gives_the_designed_faces(models):
    bgr = np.ascontiguousarray(squares(faces=THREE)[:, :, ::-1])
    with torch.no_grad():
        found = models.retinaface.detect_faces(bgr, 0.97)  # facexlib's RetinaFace decoding + NMS
    assert found.shape == (3, 15)
    found = found[np.argsort(found[:, 0])]
    for ((x, y), _), row in zip(THREE, found):
        c = np.array([x + 16, y + 16])
        np.testing.assert_allclose(row[:4], [*(c - RETINA_FACE_SIZE / 2), *(c + RETINA_FACE_SIZE / 2)], atol=1e-3)
        np.testing.assert_allclose(row[5:].reshape(5, 2), c + CANONICAL_KPS * RETINA_FACE_SIZE, atol=1e-3)
    with torch.no_grad():
        assert models.retinaface.detect_faces(np.zeros((320, 480, 3), np.uint8), 0.97).shape[0] == 0


# ----------------------------------------------------------------------------------------------
# extraction


@pytest.mark.slow
def test_extract_real_photo(models):
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()
    result = extract_identity(models, photo, source_name="astronaut.png")
    ident = result.identity
    assert ident.id_cond.shape == (1, 544) and ident.id_cond.dtype == torch.float32
    assert len(ident.id_vit_hidden) == 5 and all(h.shape == (1, 577, 32) for h in ident.id_vit_hidden)
    assert torch.allclose(ident.id_cond[0, 512:].norm(), torch.tensor(1.0), atol=1e-5)
    assert ident.face_image.shape == (512, 512, 3) and ident.face_image.dtype == torch.uint8
    assert ident.kps.shape == (5, 2) and ident.metadata["source_image"] == "astronaut.png"
    assert result.mask.shape == (512, 512) and result.mask.dtype == torch.bool
    # whitened background is exactly the parsed background
    assert (ident.face_image[~result.mask] == 255).all()
    x1, y1, x2, y2 = result.box
    assert 0 <= (x1 + x2) / 2 <= 512 and 0 <= (y1 + y2) / 2 <= 512 and x2 > x1 and y2 > y1
    again = extract_identity(models, photo)
    assert torch.equal(again.identity.id_cond, ident.id_cond)
    assert all(torch.equal(a, b) for a, b in zip(again.identity.id_vit_hidden, ident.id_vit_hidden))


@pytest.mark.slow
def test_antelope_embedding_is_the_recognizer_on_the_chosen_face(models):
    from insightface.utils import face_align

    im = squares(faces=(((320, 320), 250),))
    result = extract_identity(models, im)
    bgr = np.ascontiguousarray(im[:, :, ::-1])
    _, kps = models.detector.detect(bgr, max_num=0)
    crop = face_align.norm_crop(bgr, landmark=kps[0], image_size=112)
    expected = models.recognizer.get_feat(crop).flatten()
    np.testing.assert_allclose(result.identity.id_cond[0, :512].numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.identity.kps.numpy(), kps[0], atol=1e-6)
    assert result.face_count == 1 and result.face_index == 0


@pytest.mark.slow
def test_several_faces_largest_by_default_and_face_index_left_to_right(models, caplog):
    im = squares(faces=THREE)
    with caplog.at_level(logging.INFO, logger="consisid_core.face"):
        largest = extract_identity(models, im, source_name="group.png")
    assert largest.face_count == 3 and largest.face_index == 1  # the 250-grey face is the largest
    assert "group.png: 3 faces found; using face 1" in caplog.text
    boxes = []
    for i, (centre, gray) in enumerate(THREE):
        r = extract_identity(models, im, face_index=i)
        assert r.face_index == i
        cx, cy = (r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2
        assert abs(cx - centre[0]) < 1.5 and abs(cy - centre[1]) < 1.5
        assert abs((r.box[2] - r.box[0]) - scrfd_face_size(gray)) < 1.5
        boxes.append(r)
    assert torch.equal(boxes[1].identity.id_cond, largest.identity.id_cond)
    assert not torch.allclose(boxes[0].identity.id_cond, boxes[2].identity.id_cond)
    assert extract_identity(models, im, face_index=-1).face_index == 2
    with pytest.raises(FaceError, match="face_index 3 is out of range: group.png has 3 face"):
        extract_identity(models, im, face_index=3, source_name="group.png")


def test_no_face_is_a_clear_error(models):
    with pytest.raises(FaceError) as e:
        extract_identity(models, np.full((300, 400, 3), 40, np.uint8), source_name="dark.jpg")
    message = str(e.value)
    assert "no face found in dark.jpg" in message and "frontal" in message and "larger" in message
    assert isinstance(e.value, ConsisIDError)


@pytest.mark.slow
def test_fallback_to_aligned_crop_when_antelopev2_finds_none(models, caplog):
    import cv2

    im = squares(faces=(((320, 128), 130),))  # bright enough for RetinaFace only
    bgr = np.ascontiguousarray(im[:, :, ::-1])
    assert models.detector.detect(bgr, max_num=0)[0].shape[0] == 0
    with caplog.at_level(logging.WARNING, logger="consisid_core.face"):
        result = extract_identity(models, im, source_name="faint.png")
    assert "antelopev2 found no face" in caplog.text and result.face_count == 1
    c = np.array([336.0, 144.0])
    kps = c + CANONICAL_KPS * RETINA_FACE_SIZE
    np.testing.assert_allclose(result.identity.kps.numpy(), kps, atol=1e-3)
    from consisid_core.face.extract import FFHQ_TEMPLATE

    affine = cv2.estimateAffinePartial2D(kps.astype(np.float32), FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    aligned = cv2.warpAffine(bgr, affine, (512, 512), borderValue=(135, 133, 132))
    expected = models.recognizer.get_feat(aligned)[0]
    np.testing.assert_allclose(result.identity.id_cond[0, :512].numpy(), expected, atol=1e-4)


@pytest.mark.slow
def test_several_images_give_several_identities(models):
    a = squares(faces=(((320, 320), 250),))
    b = squares(faces=(((160, 192), 230),))
    results = extract_identities(models, [a, b], source_names=["a.png", "b.png"])
    assert [r.identity.metadata["source_image"] for r in results] == ["a.png", "b.png"]
    assert not torch.allclose(results[0].identity.id_cond, results[1].identity.id_cond)
    with pytest.raises(FaceError, match="2 images but 1 source names"):
        extract_identities(models, [a, b], source_names=["a.png"])


# ----------------------------------------------------------------------------------------------
# input kinds


def _same(r1, r2):
    assert torch.equal(r1.identity.id_cond, r2.identity.id_cond)
    assert torch.equal(r1.identity.face_image, r2.identity.face_image)


@pytest.mark.slow
def test_input_kinds_give_the_same_identity(models, tmp_path):
    from PIL import Image

    rgb = squares(faces=(((320, 320), 250),), background=30)
    base = extract_identity(models, rgb)
    _same(extract_identity(models, rgb.astype(np.uint16) * 257), base)  # 16-bit
    _same(extract_identity(models, torch.from_numpy(rgb).float()[None] / 255.0), base)  # ComfyUI IMAGE
    _same(extract_identity(models, np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), base)  # opaque RGBA
    _same(extract_identity(models, rgb[:, :, 0]), base)  # greyscale (the squares are grey)
    _same(extract_identity(models, Image.fromarray(rgb)), base)
    Image.fromarray(rgb).save(tmp_path / "face.png")
    path_result = extract_identity(models, tmp_path / "face.png")
    _same(path_result, base)
    assert path_result.identity.metadata["source_image"] == str(tmp_path / "face.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "face16.png")  # 16-bit grey PNG
    _same(extract_identity(models, tmp_path / "face16.png"), base)
    with pytest.raises(ConsisIDError, match="missing.png' does not exist"):
        extract_identity(models, tmp_path / "missing.png")


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 0
    rgba[0, 2, 3] = 128
    rgb = to_rgb_uint8(rgba)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert (rgb[0, 0] == 10).all() and (rgb[0, 1] == 255).all()
    assert abs(int(rgb[0, 2, 0]) - round(10 * 128 / 255 + 255 * (1 - 128 / 255))) <= 1
    with pytest.raises(FaceError, match="expected an image"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.slow
def test_very_large_image_box_in_input_pixels(models):
    im = np.zeros((4000, 6000, 3), np.uint8)
    im[1500:2100, 2800:3400] = 240  # a 600 px bright square → 102 px after the 1024 resize
    result = extract_identity(models, im, source_name="huge.jpg")
    cx, cy = (result.box[0] + result.box[2]) / 2, (result.box[1] + result.box[3]) / 2
    assert 2800 <= cx <= 3400 and 1500 <= cy <= 2100
    assert result.box[2] - result.box[0] > 600  # a box in the 6000-px frame, not the resized one


@pytest.mark.slow
def test_small_image(models):
    im = np.zeros((80, 100, 3), np.uint8)
    im[36:62, 36:62] = 240
    result = extract_identity(models, im, source_name="small.png")
    assert result.identity.face_image.shape == (512, 512, 3) and result.face_count >= 1
