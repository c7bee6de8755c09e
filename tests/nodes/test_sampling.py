"""nodes/sampling.py: ConsisID Sampler and Performance outside ComfyUI: a whole graph run by hand
equals the core, each check runs once, and bad values are refused in one line before any work."""

import math
import time

import numpy as np
import pytest
import torch

from node_tools import calls, model, one_line  # noqa: F401 (fixtures)
from refusals import assert_refused
from workflow_tools import import_pack

import_pack()
from consisid_pack.consisid_core.errors import ConsisIDError  # noqa: E402
from consisid_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

SAMPLER = NODE_CLASS_MAPPINGS["ConsisIDSampler"]


def test_sampler_validation_names_the_value_and_the_fix(home):
    sampler = NODE_CLASS_MAPPINGS["ConsisIDSampler"]
    assert sampler.VALIDATE_INPUTS(length=49, width=720, height=480) is True
    assert "length 50 must be 4·k + 1" in sampler.VALIDATE_INPUTS(length=50, width=720, height=480)
    assert "width 100 must be a positive multiple of 16" in sampler.VALIDATE_INPUTS(length=49, width=100, height=480)


def _image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255).unsqueeze(0)


@pytest.mark.slow
def test_a_whole_graph_equals_the_core(home, tiny_dir):
    skimage_data = pytest.importorskip("skimage.data")
    from consisid_core import Checkpoint, generate
    from consisid_core.face import extract_identity, load_face_models

    n = NODE_CLASS_MAPPINGS
    photo = skimage_data.astronaut()
    (face_models,) = n["ConsisIDFaceModelsLoader"]().load("tiny", "cpu", "cpu")
    identities, face, mask = n["ConsisIDFaceEmbed"]().embed(_image(photo), face_models, -1)
    assert len(identities) == 1 and face.shape == (1, 512, 512, 3) and mask.shape == (1, 512, 512)
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    (text,) = n["ConsisIDTextEncode"]().encode("an astronaut smiling", "blurry", model=model)
    (latent,) = n["ConsisIDSampler"]().sample(
        model, identities[0], text, 42, 3, 6.0, False, "dpm", 9, 96, 64, 1.0
    )
    assert latent["samples"].shape == (1, 4, 3, 8, 12)
    (frames,) = n["ConsisIDVAEDecode"]().decode(model, latent, False, 240, 360, 40, False, 72)
    assert frames.shape == (9, 64, 96, 3)

    core_model = Checkpoint.open(tiny_dir).load_model("fp32")
    core_identity = extract_identity(load_face_models(tiny_dir / "face_encoder"), photo).identity
    expected = generate(core_model, core_identity, "an astronaut smiling", "blurry", steps=3, seed=42)
    assert (frames - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_performance_node_feeds_the_sampler(home):
    from consisid_pack.consisid_core.performance import Performance

    n = NODE_CLASS_MAPPINGS
    (options,) = n["ConsisIDPerformance"]().options(False, "sequential", 0.0)
    assert options == Performance(offload="sequential")
    (model,) = n["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    from consisid_pack.consisid_core.text import TextEmbeddings
    from consisid_pack.consisid_core.tiny import random_identity

    identity = random_identity(model.config, seed=5)
    width = model.config.text_embed_dim
    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    args = (model, identity, text, 1, 2, 6.0, False, "dpm", 9, 96, 64, 1.0)
    plain = n["ConsisIDSampler"]().sample(*args)[0]["samples"]
    streamed = n["ConsisIDSampler"]().sample(*args, performance=options)[0]["samples"]
    assert torch.equal(plain, streamed)
    (cached,) = n["ConsisIDPerformance"]().options(False, "model", 5.0)
    skipped = n["ConsisIDSampler"]().sample(*args[:4], 8, *args[5:], performance=cached)[0]["samples"]
    assert skipped.shape == plain.shape


@pytest.mark.slow
def test_the_sampler_checks_its_run_once(home, counted_calls):
    """ConsisID Sampler prepares its run once, before ComfyUI is asked for room: each check once."""
    from consisid_pack.consisid_core import sampling
    from consisid_pack.consisid_core.identity import Identity
    from consisid_pack.consisid_core.text import TextEmbeddings
    from consisid_pack.consisid_core.tiny import random_identity

    for name in ("resolve_size", "check_steps", "check_seed", "check_options", "check_sampling_fits"):
        counted_calls.watch(sampling, name)
    counted_calls.watch(Identity, "check_compatible")
    (model,) = NODE_CLASS_MAPPINGS["ConsisIDModelLoader"]().load("tiny", "(from checkpoint)", "fp32", False)
    width = model.config.text_embed_dim
    text = TextEmbeddings(torch.zeros(1, 226, width), torch.ones(1, 226, width))
    NODE_CLASS_MAPPINGS["ConsisIDSampler"]().sample(
        model, random_identity(model.config), text, 1, 1, 6.0, False, "ddim", 9, 96, 64, 1.0)
    assert counted_calls == {"resolve_size": 1, "check_steps": 1, "check_seed": 1, "check_compatible": 1, "check_options": 1,
                     "check_sampling_fits": 1}


@pytest.mark.parametrize(
    "values, says",
    [
        (dict(length=100001), "length 100001 must be a whole number from 1 to 1025"),
        (dict(length=10**400), f"length {'1' + '0' * 119}… must be a whole number from 1 to 1025"),
        (dict(length=49.5), "length 49.5 must be a whole number from 1 to 1025"),
        (dict(length="49"), "length 49 must be a whole number from 1 to 1025"),
        (dict(length=True), "length True must be a whole number from 1 to 1025"),
        (dict(length=50), "length 50 must be 4·k + 1 (49 for ConsisID; e.g. 49)"),
        (dict(width=100000), "width 100000 must be a whole number from 16 to 4096"),
        (dict(width=math.nan), "width nan must be a whole number from 16 to 4096"),
        (dict(width=720.5), "width 720.5 must be a whole number from 16 to 4096"),
        (dict(width=-math.inf), "width -inf must be a whole number from 16 to 4096"),
        (dict(height=-480), "height -480 must be a whole number from 16 to 4096"),
        (dict(height=10**400), f"height {'1' + '0' * 119}… must be a whole number from 16 to 4096"),
    ],
)
def test_sampler_validation_refuses_sizes_beyond_the_declared(values, says):
    assert SAMPLER.VALIDATE_INPUTS(length=49, width=720, height=480) is True
    assert one_line(SAMPLER.VALIDATE_INPUTS(**{"length": 49, "width": 720, "height": 480, **values})) == says


def sample_args(model, identity, text, **changes) -> dict:
    args = dict(
        model=model, identity=identity, text=text, seed=1, steps=1, cfg=6.0, dynamic_cfg=False,
        scheduler="dpm", length=9, width=96, height=64, identity_strength=1.0,
    )
    return {**args, **changes}


def nan_image() -> torch.Tensor:
    image = torch.rand(1, 64, 96, 3)
    image[0, 10, 10, 1] = math.nan
    return image


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(cfg=math.nan), "cfg nan must be a finite number from 0 to 100"),
        (dict(cfg=math.inf), "cfg inf must be a finite number from 0 to 100"),
        (dict(cfg=-1.0), "cfg -1.0 must be a finite number from 0 to 100"),
        (dict(identity_strength=math.nan), "identity strength nan must be a finite number from 0 to 10"),
        (dict(identity_strength=11.0), "identity strength 11.0 must be a finite number from 0 to 10"),
        (dict(seed=-1), "seed -1 must be a whole number from 0 to "),
        (dict(seed=2**64), f"seed {2**64} must be a whole number from 0 to "),
        (dict(steps=0), "steps 0 must be a whole number from 1 to 1000"),
        (dict(steps=5000), "steps 5000 must be a whole number from 1 to 1000"),
        (dict(length=73), "frame count 73 is over this checkpoint's maximum of 72 per pass (8 × its trained 9); "
                          "pass allow_oversize"),
        (dict(length=401), "frame count 401 is over this checkpoint's maximum of 72"),
        (dict(width=100000), "width 100000 is over this checkpoint's maximum of 384"),
        (dict(length=10), "frame count 10 does not fit this checkpoint: it must be 4·k + 1"),
        (dict(start_image=nan_image()), "the start_image holds NaN or infinite pixels; connect a Load Image"),
        (dict(start_image=torch.zeros(0, 64, 96, 3)), "the start_image (float32 [0, 64, 96, 3]) is not an IMAGE"),
        (dict(start_image=torch.zeros(64, 96, 3)), "the start_image (float32 [64, 96, 3]) is not an IMAGE"),
    ],
)
def test_sampler_refuses_bad_values_before_any_work(model, identity, text, calls, changes, says):
    start = time.perf_counter()
    message = assert_refused(lambda: SAMPLER().sample(**sample_args(model, identity, text, **changes)), error=ConsisIDError)
    assert message.startswith(says)
    assert calls == [] and time.perf_counter() - start < 5


@pytest.mark.slow
def test_sampler_oversize_runs_when_allowed(model, identity, text, calls):
    """The counterpart of the refusals: 73 frames with allow_oversize, and the hooks see the work."""
    (latent,) = SAMPLER().sample(**sample_args(model, identity, text, length=73), allow_oversize=True)
    assert latent["samples"].shape == (1, 4, 19, 8, 12)
    assert "transformer" in calls and "vae encoder" in calls
