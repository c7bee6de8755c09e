"""ConsisID Seed, ConsisID Step Cache and native long videos in a real ComfyUI server (v0.33.0, CPU),
through /prompt, on test_native_comfyui's tiny native checkpoint and random CogVideoX VAE."""

import numpy as np
import pytest
import torch
from PIL import Image

from native_tools import NEEDS_NATIVE
from native_server import NATIVE_LOADER, SIZE, custom_advanced, native_head, saved_latent, assert_success, base, server  # noqa: F401

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, NEEDS_NATIVE]


def _one_seed(prefix: str, seed: int) -> dict:
    """SamplerCustomAdvanced with ConsisID Seed's noise and sampler, its seed into first_frame_seed."""
    prompt = native_head(NATIVE_LOADER, first_frame_seed=["seed", 2]) | custom_advanced(prefix)
    del prompt["noise"], prompt["sampler"]
    prompt["seed"] = {"class_type": "ConsisIDSeed", "inputs": {"seed": seed}}
    prompt["sample"]["inputs"] |= {"noise": ["seed", 0], "sampler": ["seed", 1]}
    return prompt


def test_the_one_seed_graph_is_the_three_seed_graph(server):
    three = native_head(NATIVE_LOADER, first_frame_seed=5) | custom_advanced(
        "features/three", sampler={"class_type": "ConsisIDDPMSampler", "inputs": {"noise_seed": 5}})
    assert_success(server.run(three))
    assert_success(server.run(_one_seed("features/one", 5)))
    assert_success(server.run(_one_seed("features/other", 6)))
    assert torch.equal(saved_latent(server, "features/one"), saved_latent(server, "features/three"))
    assert not torch.equal(saved_latent(server, "features/other"), saved_latent(server, "features/three"))


def test_the_step_cache_runs_in_a_graph_and_at_zero_is_the_plain_model(server):
    for threshold in (0.0, 1.0):
        cache = {"cache": {"class_type": "ConsisIDStepCache", "inputs": {"model": ["model", 0], "threshold": threshold}}}
        assert_success(server.run(native_head(NATIVE_LOADER) | cache | custom_advanced(f"features/cache{threshold}", model=("cache", 0))))
    assert_success(server.run(native_head(NATIVE_LOADER) | custom_advanced("features/uncached")))
    assert torch.equal(saved_latent(server, "features/cache0.0"), saved_latent(server, "features/uncached"))
    assert torch.isfinite(saved_latent(server, "features/cache1.0")).all()


def _segment(name: str, seed: int, start=None) -> dict:
    """One segment: its Identity Conditioning (from `start`), ConsisID Seed, sampling and decode; nodes `name_*`."""
    cond = native_head({}, first_frame_seed=[f"{name}_seed", 2], **({} if start is None else {"start_image": start}))["cond"]
    return {
        f"{name}_seed": {"class_type": "ConsisIDSeed", "inputs": {"seed": seed}},
        f"{name}_cond": cond,
        f"{name}_guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": [f"{name}_cond", 0],
                                                                   "negative": [f"{name}_cond", 1], "cfg": 6.0}},
        f"{name}_sample": {"class_type": "SamplerCustomAdvanced",
                           "inputs": {"noise": [f"{name}_seed", 0], "guider": [f"{name}_guider", 0],
                                      "sampler": [f"{name}_seed", 1], "sigmas": ["sigmas", 0],
                                      "latent_image": [f"{name}_cond", 2]}},
        f"{name}_frames": {"class_type": "ConsisIDNativeVAEDecode",
                           "inputs": {"samples": [f"{name}_sample", 0], "vae": ["vae", 0]}},
    }


def _frames(server, prefix: str) -> np.ndarray:
    paths = sorted((server.base / "output").glob(f"{prefix}_*.png"))
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def test_a_native_long_video_starts_each_segment_from_the_last_frame_and_its_first_is_a_single_run(server):
    """Two segments as the shipped native long-video workflow chains them (Image From Batch -1 into
    start_image, seeds 5 and 6, Append Segment with colour matching): 9 + 8 frames, the first nine
    those of a single native run with seed 5; the second segment is a run from the first's last frame."""
    common = native_head(NATIVE_LOADER) | {
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 3,
                                                              "denoise": 1.0}},
    }
    del common["cond"]
    single = common | _segment("one", 5) | {
        "save": {"class_type": "SaveImage", "inputs": {"images": ["one_frames", 0], "filename_prefix": "features/single"}}}
    assert_success(server.run(single))
    long_video = common | _segment("one", 5) | _segment("two", 6, start=["last", 0]) | {
        "last": {"class_type": "ImageFromBatch", "inputs": {"image": ["one_frames", 0], "batch_index": -1, "length": 1}},
        "join": {"class_type": "ConsisIDAppendSegment",
                 "inputs": {"video": ["one_frames", 0], "segment": ["two_frames", 0], "colour_match": True}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["join", 0], "filename_prefix": "features/long"}},
        "second": {"class_type": "SaveImage", "inputs": {"images": ["two_frames", 0], "filename_prefix": "features/two"}},
    }
    assert_success(server.run(long_video))
    one, joined, two = _frames(server, "features/single"), _frames(server, "features/long"), _frames(server, "features/two")
    assert one.shape == (SIZE["length"], SIZE["height"], SIZE["width"], 3) and len(joined) == 2 * SIZE["length"] - 1
    assert np.array_equal(joined[: SIZE["length"]], one)
    assert not np.array_equal(joined[SIZE["length"]:], two[1:])  # colour-matched
    # the second segment is a run of its own from the first's last frame (SaveImage's PNG of it: truncated
    # to uint8 where the chain rounds, so a level off here and there, and the frames within a few levels)
    Image.fromarray(one[-1]).save(server.base / "input" / "last_frame.png")
    alone = common | _segment("two", 6, start=["photo", 0]) | {
        "photo": {"class_type": "LoadImage", "inputs": {"image": "last_frame.png"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["two_frames", 0], "filename_prefix": "features/alone"}},
    }
    assert_success(server.run(alone))
    diff = np.abs(_frames(server, "features/alone").astype(int) - two.astype(int))
    print(f"segment 2 from the saved last frame: max {diff.max()} levels, mean {diff.mean():.3f}")
    assert diff.max() <= 8 and diff.mean() < 0.25  # SaveImage truncates: a few levels, rarely
