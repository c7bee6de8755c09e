"""A tiny `face_encoder/` folder in the real file formats, for tests and the offline demo: every
file loads through the same code as the released ones (`load_face_models`), and a bright pixel
makes a face. How each model is built: docs/dev/architecture.md, "The tiny face encoder".
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import ANTELOPE_DIR, BISENET_FILE, DETECTION_FILE, EVA_FILE, RECOGNITION_FILE, RETINAFACE_FILE
from .models import facexlib_models

logger = logging.getLogger(__name__)

TINY_EVA = dict(width=32, depth=24, heads=2, mlp_hidden=85, embed_dim=32, patch_size=14, image_size=336)
"""id_cond is 512 + 32 = 544 wide; hidden states are 5 × [1, 577, 32]."""
RECOGNITION_DIM = 512

SCRFD_MIN_GRAY = 160.0
"""An SCRFD anchor fires when its pixel's mean of R, G, B (0..255) is above this."""
SCRFD_SCORE_GAIN = 0.05
"""Score logit per grey level above SCRFD_MIN_GRAY (score = sigmoid(gain × (grey - min)))."""
RETINA_MIN_GRAY = 100.0
"""A RetinaFace prior fires (softmax score > 0.97) when its pixel's grey level is a little above this."""
RETINA_SCORE_GAIN = 100.0 / 255.0
RETINA_FACE_SIZE = 128.0
CANONICAL_KPS = np.array([[-0.17, -0.12], [0.17, -0.12], [0.0, 0.05], [-0.14, 0.22], [0.14, 0.22]])
"""Left eye, right eye, nose, mouth corners relative to the face centre, in units of the face size."""


def scrfd_face_size(gray: float) -> float:
    """Side of the (square) face box the tiny SCRFD gives a pixel of this grey level (0..255)."""
    return 320.0 * gray / 255.0 - 96.0


def _scrfd_gray_scale() -> tuple[float, float]:
    """SCRFD feeds (pixel - 127.5) / 128; the mean over channels is g. grey = 128 g + 127.5."""
    return 128.0, 127.5


def write_tiny_face_encoder(face_encoder_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny face_encoder folder (see the module doc); same seed, same bytes."""
    root = Path(face_encoder_dir)
    (root / ANTELOPE_DIR).mkdir(parents=True, exist_ok=True)
    _write_scrfd(root / ANTELOPE_DIR / DETECTION_FILE)
    _write_arcface(root / ANTELOPE_DIR / RECOGNITION_FILE, seed)
    torch.save(tiny_retinaface_state_dict(), root / RETINAFACE_FILE)
    torch.save(_tiny_bisenet_state_dict(seed), root / BISENET_FILE)
    torch.save(tiny_eva_state_dict(seed), root / EVA_FILE)
    logger.info("wrote a tiny face encoder (seed %d) to %s", seed, root)
    return root


# ---------------------------------------------------------------------------------------------
# insightface ONNX files


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="consisid-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _write_scrfd(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    scale, offset = _scrfd_gray_scale()
    nodes, inits, outputs = [], [], []
    per_level = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        fires = stride == 32
        # Each head is a 1×1 conv of stride `stride` on the input: a point sample of the pixel at the
        # anchor, as a linear function of its grey level g (mean of the three normalised channels).
        # Channels are anchor-major: [anchor0: k values, anchor1: k values].
        for head, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            w = np.zeros((2 * k, 3, 1, 1), np.float32)
            b = np.zeros((2 * k,), np.float32)
            if head == "score":
                gain = SCRFD_SCORE_GAIN * scale if fires else 0.0
                w[0, :, 0, 0] = gain / 3
                b[0] = SCRFD_SCORE_GAIN * (offset - SCRFD_MIN_GRAY) if fires else -30.0
                b[1] = -30.0
            elif fires:
                # size(grey) = 320 grey/255 - 96 = a g + c; distances are in units of the stride.
                a, c = 320.0 * scale / 255.0, 320.0 * offset / 255.0 - 96.0
                unit = np.full(4, 0.5) if head == "bbox" else CANONICAL_KPS.reshape(-1)
                w[:k, :, 0, 0] = (a * unit / stride / 3)[:, None]
                b[:k] = c * unit / stride
            name = f"{head}_{stride}"
            inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
            shape = numpy_helper.from_array(np.array([-1, k], np.int64), f"{name}_shape")
            inits.append(shape)
            nodes += [
                helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                                 kernel_shape=[1, 1], strides=[stride, stride], name=f"conv_{name}"),
                helper.make_node("Transpose", [f"{name}_conv"], [f"{name}_nhwc"], perm=[0, 2, 3, 1],
                                 name=f"transpose_{name}"),
                helper.make_node("Reshape", [f"{name}_nhwc", f"{name}_shape"],
                                 [f"{name}_flat" if head == "score" else name], name=f"reshape_{name}"),
            ]
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [f"{name}_flat"], [name], name=f"sigmoid_{name}"))
            per_level[head].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{stride}", k]))
    outputs = per_level["score"] + per_level["bbox"] + per_level["kps"]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    _save_onnx(helper.make_graph(nodes, "tiny_scrfd", [inp], outputs, inits), path)


def _write_arcface(path: Path, seed: int) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed + 1)
    features = 3 * 14 * 14
    w = (rng.standard_normal((features, RECOGNITION_DIM)) / math.sqrt(features)).astype(np.float32)
    b = (rng.standard_normal(RECOGNITION_DIM) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], name="fc"),
    ]
    inits = [numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(b, "fc_b")]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", RECOGNITION_DIM])
    _save_onnx(helper.make_graph(nodes, "tiny_arcface", [inp], [out], inits), path)


# ---------------------------------------------------------------------------------------------
# facexlib files


def tiny_retinaface_state_dict() -> dict[str, torch.Tensor]:
    """RetinaFace(mobile0.25) weights that carry each pixel's grey level to the stride-32 heads.

    Channel 0 of every layer passes the grey level through (all other weights are zero): each 3×3
    convolution uses only its centre tap, except the last stride-2 one which takes the tap at +1, so
    the stride-32 cell (r, c) sees pixel (32r + 16, 32c + 16), the centre of its priors.
    """
    RetinaFace, _ = facexlib_models()
    model = RetinaFace(network_name="mobile0.25", half=False, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
        stride2 = [m for m in model.body.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
        for m in model.body.modules():
            if not isinstance(m, torch.nn.Conv2d):
                continue
            tap = 2 if m is stride2[-1] else m.kernel_size[0] // 2
            if m.in_channels == 3:  # first conv: grey/255 of the mean-subtracted BGR input
                m.weight[0, :, tap, tap] = 1.0 / (3 * 255.0)
            else:
                m.weight[0, 0, tap, tap] = 1.0
        first_bn = next(m for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
        first_bn.bias[0] = (104.0 + 117.0 + 123.0) / 3 / 255.0  # undo RetinaFace's mean subtraction
        model.fpn.output3[0].weight[0, 0, 0, 0] = 1.0
        model.ssh3.conv3X3[0].weight[0, 0, 1, 1] = 1.0
        prior = 256.0  # the first prior of the stride-32 level (min_sizes[2][0])
        for level in range(3):
            cls_bias = model.ClassHead[level].conv1x1.bias
            cls_bias[1] = cls_bias[3] = -50.0
        model.ClassHead[2].conv1x1.weight[1, 0, 0, 0] = RETINA_SCORE_GAIN * 255.0
        model.ClassHead[2].conv1x1.bias[1] = -RETINA_SCORE_GAIN * RETINA_MIN_GRAY
        size = 5.0 * math.log(RETINA_FACE_SIZE / prior)  # decode: wh = prior · exp(0.2 · loc)
        model.BboxHead[2].conv1x1.bias[:4] = torch.tensor([0.0, 0.0, size, size])
        kps = torch.from_numpy(CANONICAL_KPS.reshape(-1) * RETINA_FACE_SIZE / (0.1 * prior))
        model.LandmarkHead[2].conv1x1.bias[:10] = kps.float()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _tiny_bisenet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    _, BiSeNet = facexlib_models()
    torch.manual_seed(seed + 2)  # BiSeNet's own init draws from the global generator
    state = BiSeNet(num_class=19).state_dict()
    return {k: (v.half() if v.is_floating_point() else v).clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# EVA-CLIP


def _eva_rope(head_dim: int, grid: int, pt_grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-CLIP's VisionRotaryEmbeddingFast buffers (they ride along in its state dicts)."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * pt_grid
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)
    freqs = torch.cat([freqs[:, None, :].expand(grid, grid, -1), freqs[None, :, :].expand(grid, grid, -1)], -1)
    freqs = freqs.reshape(-1, freqs.shape[-1])
    return freqs.cos(), freqs.sin()


def tiny_eva_state_dict(seed: int, **sizes) -> dict[str, torch.Tensor]:
    """An original-format EVA02-CLIP checkpoint (`visual.*` keys) with seeded random weights."""
    cfg = TINY_EVA | sizes
    w, hid, emb, p = cfg["width"], cfg["mlp_hidden"], cfg["embed_dim"], cfg["patch_size"]
    grid = cfg["image_size"] // p
    g = torch.Generator().manual_seed(seed + 3)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def ln(n):
        return {"weight": 1.0 + rnd(n, std=0.1), "bias": rnd(n, std=0.1)}

    cos, sin = _eva_rope(w // cfg["heads"], grid)
    sd = {
        "cls_token": rnd(1, 1, w),
        "pos_embed": rnd(1, grid * grid + 1, w),
        "patch_embed.proj.weight": rnd(w, 3, p, p),
        "patch_embed.proj.bias": rnd(w),
        "rope.freqs_cos": cos,
        "rope.freqs_sin": sin,
    }
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        sd |= {b + "norm1." + k: v for k, v in ln(w).items()}
        sd |= {
            b + "attn.q_bias": rnd(w),
            b + "attn.v_bias": rnd(w),
            b + "attn.q_proj.weight": rnd(w, w, std=0.1),
            b + "attn.k_proj.weight": rnd(w, w, std=0.1),
            b + "attn.v_proj.weight": rnd(w, w, std=0.1),
        }
        sd |= {b + "attn.inner_attn_ln." + k: v for k, v in ln(w).items()}
        sd |= {b + "attn.proj.weight": rnd(w, w, std=0.1), b + "attn.proj.bias": rnd(w)}
        sd |= {b + "attn.rope.freqs_cos": cos.clone(), b + "attn.rope.freqs_sin": sin.clone()}
        sd |= {b + "norm2." + k: v for k, v in ln(w).items()}
        sd |= {
            b + "mlp.w1.weight": rnd(hid, w, std=0.1),
            b + "mlp.w1.bias": rnd(hid),
            b + "mlp.w2.weight": rnd(hid, w, std=0.1),
            b + "mlp.w2.bias": rnd(hid),
        }
        sd |= {b + "mlp.ffn_ln." + k: v for k, v in ln(hid).items()}
        sd |= {b + "mlp.w3.weight": rnd(w, hid, std=0.1), b + "mlp.w3.bias": rnd(w)}
    sd |= {"norm." + k: v for k, v in ln(w).items()}
    sd |= {"head.weight": rnd(emb, w, std=0.1), "head.bias": rnd(emb)}
    out = {"visual." + k: v.contiguous() for k, v in sd.items()}
    out["logit_scale"] = torch.tensor(math.log(100.0))
    return out
