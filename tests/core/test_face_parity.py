"""Parity with the reference: diffusers' `consisid_utils.process_face_embeddings_infer` on the same files.

The reference objects are built the way `prepare_face_models` builds them (FaceRestoreHelper, BiSeNet,
insightface FaceAnalysis + glintr100, consisid_eva_clip's EVA vision tower), on CPU, from the tiny face
encoder's files. `prepare_face_models` itself hard-codes CUDA and the real EVA size, and
FaceRestoreHelper would download its detector, so the two facexlib loaders it calls are replaced by
ones that read our files with facexlib's own classes (that replaces the reference's file lookup only,
not any of its computation).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from consisid_core.face import extract_identity, load_face_models, write_tiny_face_encoder
from consisid_core.face.tiny import TINY_EVA

pytest.importorskip("consisid_eva_clip")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory):
    return write_tiny_face_encoder(tmp_path_factory.mktemp("tiny_parity") / "face_encoder", seed=7)


def _reference_eva(face_dir):
    from consisid_eva_clip.eva_vit_model import EVAVisionTransformer

    visual = EVAVisionTransformer(
        img_size=TINY_EVA["image_size"], patch_size=TINY_EVA["patch_size"], num_classes=TINY_EVA["embed_dim"],
        use_mean_pooling=False, init_values=None, patch_dropout=0.0, embed_dim=TINY_EVA["width"],
        depth=TINY_EVA["depth"], num_heads=TINY_EVA["heads"], mlp_ratio=2.6667, qkv_bias=True,
        drop_path_rate=0.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), xattn=True, rope=True,
        postnorm=False, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True,
    )
    assert int(TINY_EVA["width"] * 2.6667) == TINY_EVA["mlp_hidden"]
    state = torch.load(face_dir / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True)
    visual.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("visual.")}, strict=True)
    return visual.eval()


@pytest.fixture(scope="module")
def reference(face_dir):
    import insightface
    from consisid_eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.bisenet import BiSeNet
    from facexlib.utils import face_restoration_helper
    from insightface.app import FaceAnalysis

    def init_detection_model(model_name, half=False, device="cuda", model_rootpath=None):
        assert model_name == "retinaface_resnet50" and model_rootpath == str(face_dir)
        model = RetinaFace(network_name="mobile0.25", half=half, device=device)  # the tiny file's backbone
        model.load_state_dict(torch.load(face_dir / "detection_Resnet50_Final.pth", weights_only=True))
        return model.eval().to(device)

    def init_parsing_model(model_name="bisenet", half=False, device="cuda", model_rootpath=None):
        model = BiSeNet(num_class=19)  # (FaceRestoreHelper also asks for parsenet, then it is replaced)
        model.load_state_dict(torch.load(face_dir / "parsing_bisenet.pth", weights_only=True))
        return model.eval().to(device)

    mp = pytest.MonkeyPatch()
    mp.setattr(face_restoration_helper, "init_detection_model", init_detection_model)
    mp.setattr(face_restoration_helper, "init_parsing_model", init_parsing_model)
    try:
        helper_1 = face_restoration_helper.FaceRestoreHelper(
            upscale_factor=1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
            save_ext="png", device="cpu", model_rootpath=str(face_dir),
        )
        helper_1.face_parse = init_parsing_model("bisenet", device="cpu")
    finally:
        mp.undo()
    helper_2 = insightface.model_zoo.get_model(
        str(face_dir / "models/antelopev2/glintr100.onnx"), providers=["CPUExecutionProvider"]
    )
    helper_2.prepare(ctx_id=0)
    app = FaceAnalysis(name="antelopev2", root=str(face_dir), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    helper_1.face_det.eval()
    helper_1.face_parse.eval()
    return dict(
        face_helper_1=helper_1, clip_vision_model=_reference_eva(face_dir), face_helper_2=helper_2,
        eva_transform_mean=OPENAI_DATASET_MEAN, eva_transform_std=OPENAI_DATASET_STD, app=app,
        device="cpu", weight_dtype=torch.float32,
    )


def _photo(size, square, gray):
    """The astronaut photo, darkened below both tiny detectors' thresholds, tiled to `size` (h, w),
    with one bright square (y0, y1, x0, x1): one face for both detectors, on textured surroundings."""
    from skimage.data import astronaut

    h, w = size
    tiled = np.tile(astronaut(), (h // 512 + 1, w // 512 + 1, 1))[:h, :w]
    im = (tiled.astype(np.float32) * 0.35).astype(np.uint8)
    y0, y1, x0, x1 = square
    im[y0:y1, x0:x1] = gray
    return im


CASES = {
    # one face found by both detectors
    "both": ((640, 640), (184, 216, 312, 344), 235),
    # larger than 1024: resized by the Lanczos-4 step first (1280×960 → 1024×768)
    "resized": ((960, 1280), (622, 671, 622, 671), 240),
    # only RetinaFace finds it: the embedding comes from the aligned crop, kps from RetinaFace
    "fallback": ((640, 640), (120, 152, 312, 344), 130),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_process_face_embeddings_infer(face_dir, reference, case):
    from diffusers.pipelines.consisid import consisid_utils
    from facexlib.utils.misc import img2tensor
    from torchvision.transforms.functional import normalize

    size, square, gray = CASES[case]
    image = _photo(size, square, gray)
    with torch.no_grad():
        ref_cond, ref_hidden, ref_face, ref_kps = consisid_utils.process_face_embeddings_infer(
            img_file_path=image, is_align_face=True, **reference
        )
    models = load_face_models(face_dir)
    ours = extract_identity(models, image, source_name=case)
    ident = ours.identity

    assert ident.id_cond.shape == ref_cond.shape == (1, 544)
    assert (ident.id_cond - ref_cond).abs().max().item() <= 1e-4
    assert len(ident.id_vit_hidden) == len(ref_hidden) == 5
    for a, b in zip(ident.id_vit_hidden, ref_hidden):
        assert a.shape == b.shape == (1, 577, 32)
        assert (a - b).abs().max().item() <= 1e-4
    np.testing.assert_allclose(ident.kps.numpy(), np.asarray(ref_kps, np.float32), rtol=0, atol=1e-4)
    # the whitened face image (the reference's first frame) is identical
    assert np.array_equal(ident.face_image.numpy(), np.asarray(ref_face))
    # the aligned crop and the parsed mask are identical
    helper = reference["face_helper_1"]
    assert len(helper.cropped_faces) == 1
    crop_bgr = helper.cropped_faces[0]
    assert np.array_equal(ours.aligned_face.numpy(), crop_bgr[:, :, ::-1])
    with torch.no_grad():
        x = img2tensor(crop_bgr, bgr2rgb=True).unsqueeze(0) / 255.0
        parsing = helper.face_parse(normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))[0].argmax(1)
    ref_bg = sum(parsing == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()[0]
    assert torch.equal(ours.mask, ~ref_bg)
    assert 0 < ours.mask.sum() < ours.mask.numel()


@pytest.mark.slow
def test_eva_tower_matches_consisid_eva_clip(face_dir):
    from consisid_core.face.eva import load_eva_tower

    ours = load_eva_tower(face_dir / "EVA02_CLIP_L_336_psz14_s6B.pt")
    ref = _reference_eva(face_dir)
    x = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_emb, ref_hidden = ref(x, return_all_features=False, return_hidden=True, shuffle=False)
        emb, hidden = ours(x)
    assert emb.shape == ref_emb.shape == (2, 32)
    assert (emb - ref_emb).abs().max() <= 1e-4
    assert len(hidden) == len(ref_hidden) == 5
    for a, b in zip(hidden, ref_hidden):
        assert a.shape == (2, 577, 32) and (a - b).abs().max() <= 1e-4
