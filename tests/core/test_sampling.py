"""Sampling: checks before work, progress, stopping, options that do not stick."""

import logging

import pytest
import torch

from consisid_core.errors import ConsisIDError, GenerationCancelled, IdentityError
from consisid_core.sampling import decode, sample
from consisid_core.text import TextEmbeddings, load_text_encoder
from consisid_core.tiny import random_identity


class Counter:
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, step, total, latents):
        self.calls.append((step, total, tuple(latents.shape)))
        if step == self.stop_at:
            raise GenerationCancelled("stopped")


@pytest.mark.parametrize(
    "size,message",
    [
        (dict(length=10), r"frame count 10 does not fit this checkpoint: it must be 4·k \+ 1 .*e\.g\. 9 or 13"),
        (dict(length=0), r"frame count 0 does not fit"),
        (dict(height=70), r"height 70 does not fit this checkpoint: it must be a positive multiple of 16"),
        (dict(width=-16), r"width -16 does not fit"),
    ],
)
def test_bad_sizes_fail_before_any_step(tiny_model, identity, text, size, message):
    counter = Counter()
    with pytest.raises(ConsisIDError, match=message):
        sample(tiny_model, identity, text, steps=2, callback=counter, **size)
    assert counter.calls == []


def test_keypoint_checkpoint_needs_two_latent_frames(tiny_kps_dir):
    from consisid_core.checkpoint import Checkpoint

    model = Checkpoint.open(tiny_kps_dir).load_model("fp32")
    identity = random_identity(model.config)
    width = model.config.text_embed_dim
    text = TextEmbeddings(torch.zeros(1, 226, width), torch.zeros(1, 226, width))
    with pytest.raises(ConsisIDError, match="frame count 5 does not fit .* at least 9"):
        sample(model, identity, text, length=5, steps=1)


def test_identity_of_another_checkpoint(tiny_model, text):
    other = random_identity({"LFE_id_dim": 1280, "LFE_vit_dim": 1024, "LFE_num_scale": 5})
    with pytest.raises(IdentityError, match="does not fit this checkpoint"):
        sample(tiny_model, other, text, steps=1)


def test_text_of_another_encoder(tiny_model, identity):
    wide = TextEmbeddings(torch.zeros(1, 226, 4096), torch.zeros(1, 226, 4096))
    with pytest.raises(ConsisIDError, match="4096 wide, this transformer takes 32"):
        sample(tiny_model, identity, wide, steps=1)


def test_text_must_be_padded_to_226():
    with pytest.raises(ConsisIDError, match=r"must be \[1, 226, width\], found \[1, 77, 32\]"):
        TextEmbeddings(torch.zeros(1, 77, 32), torch.zeros(1, 77, 32))


def test_zero_steps(tiny_model, identity, text):
    with pytest.raises(ConsisIDError, match="steps 0 must be a whole number from 1 to 1000"):
        sample(tiny_model, identity, text, steps=0)


def test_unknown_scheduler(tiny_model, identity, text):
    with pytest.raises(ConsisIDError, match="scheduler 'euler' is not one of dpm, ddim"):
        sample(tiny_model, identity, text, steps=1, scheduler="euler")


@pytest.mark.slow
def test_callback_sees_every_step(tiny_model, identity, text):
    counter = Counter()
    latents = sample(tiny_model, identity, text, steps=3, callback=counter)
    assert latents.shape == (1, 3, 4, 8, 12)
    assert counter.calls == [(1, 3, (1, 3, 4, 8, 12)), (2, 3, (1, 3, 4, 8, 12)), (3, 3, (1, 3, 4, 8, 12))]
    frames = decode(tiny_model.vae, latents)
    assert frames.shape == (9, 64, 96, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1


@pytest.mark.slow
def test_a_callback_stops_the_run_and_options_do_not_stick(tiny_model, identity, text):
    scale = tiny_model.transformer.local_face_scale
    counter = Counter(stop_at=2)
    with pytest.raises(GenerationCancelled):
        sample(tiny_model, identity, text, steps=5, callback=counter, identity_strength=3.0)
    assert [c[0] for c in counter.calls] == [1, 2]
    assert tiny_model.transformer.local_face_scale == scale
    assert next(tiny_model.transformer.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_identity_strength_acts_for_one_run_only(tiny_model, identity, text):
    plain = sample(tiny_model, identity, text, steps=2, seed=1)
    strong = sample(tiny_model, identity, text, steps=2, seed=1, identity_strength=4.0)
    again = sample(tiny_model, identity, text, steps=2, seed=1)
    assert (strong - plain).abs().max() > 1e-3
    assert torch.equal(plain, again)


@pytest.mark.slow
def test_ddim_scheduler_runs(tiny_model, identity, text):
    dpm = sample(tiny_model, identity, text, steps=2, seed=1)
    ddim = sample(tiny_model, identity, text, steps=2, seed=1, scheduler="ddim")
    assert ddim.shape == dpm.shape and not torch.equal(ddim, dpm)


def test_other_sizes_run(tiny_model, identity, text):
    latents = sample(tiny_model, identity, text, steps=1, length=5, height=32, width=48)
    assert latents.shape == (1, 2, 4, 4, 6)


@pytest.mark.parametrize("frames,decoded", [(5, 8), (9, 9), (13, 16), (17, 17)])
def test_an_even_latent_count_decodes_to_more_frames_and_says_so(tiny_model, identity, text, caplog, frames, decoded):
    with caplog.at_level(logging.WARNING, logger="consisid_core.sampling"):
        latents = sample(tiny_model, identity, text, steps=1, length=frames, height=32, width=48)
    assert len(decode(tiny_model.vae, latents)) == decoded
    warned = f"{frames} frames are {latents.shape[1]} latent frames, an even number" in caplog.text
    assert warned == (decoded != frames)


@pytest.mark.slow
def test_tiled_and_sliced_decode_is_close_and_does_not_stick(tiny_model, identity, text):
    from consisid_core.tiling import Tiling

    latents = sample(tiny_model, identity, text, steps=2, seed=3)
    plain = decode(tiny_model.vae, latents)
    vae = tiny_model.vae
    before = (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_height)
    tiled = decode(tiny_model.vae, latents, tiling=Tiling(32, 48, 8, 16), slicing=True)
    assert (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_height) == before
    assert tiled.shape == plain.shape
    # tiles are blended at their seams, so the frames differ a little, not wholesale
    assert 0 < (tiled - plain).abs().mean() < 0.05


@pytest.mark.slow
def test_decode_a_batch_of_videos(tiny_model, identity, text):
    latents = sample(tiny_model, identity, text, steps=1, seed=3)
    frames = decode(tiny_model.vae, torch.cat([latents, latents]), slicing=True)
    assert frames.shape == (18, 64, 96, 3)
    assert torch.equal(frames[:9], frames[9:])


@pytest.mark.parametrize("tiling", [(30, 48, 8, 16), (32, 48, 12, 16), (32, 48, 32, 16)])
def test_tiles_off_the_latent_grid_are_refused(tiny_model, tiling):
    from consisid_core.tiling import Tiling

    latents = torch.zeros(1, 3, 4, 8, 12)
    with pytest.raises(ConsisIDError, match="px overlap does not fit the VAE's 8-px latent grid"):
        decode(tiny_model.vae, latents, tiling=Tiling(*tiling))
    assert tiny_model.vae.use_tiling is False


def test_accepted_tilings_land_exactly_on_the_latent_grid():
    """What diffusers' tiled decode does with the factors: stride and crop agree, for every tile
    and overlap accepted; the rest are refused with overlaps that work."""
    from consisid_core.tiling import Tiling

    accepted = 0
    for tile in range(16, 513, 8):
        for overlap in range(0, tile, 8):
            try:
                factor, _ = Tiling(tile, tile, overlap, overlap).factors(8)
            except ConsisIDError as e:
                assert "overlaps that work with this tile" in str(e)
                continue
            accepted += 1
            assert int(tile // 8 * (1 - factor)) * 8 == tile - int(tile * factor) == tile - overlap
    assert accepted > 1000
    Tiling().factors(8)
    Tiling(240, 360, 48, 48).factors(8)  # one overlap both ways


def test_half_frame_tiles_fit_every_size():
    """`Tiling.halves` (the out-of-memory retry's and the bench's tiles) cuts each side in two,
    with overlaps diffusers' tiled decode steps exactly, at every size the sampler accepts."""
    from consisid_core.tiling import Tiling

    for size in range(32, 2049, 16):  # 16 px is a single 2×2 latent: nothing to cut
        tiling = Tiling.halves(size, size)
        tiling.factors(8)
        assert 2 * tiling.tile_height - tiling.overlap_height >= size > tiling.tile_height
    assert Tiling.halves(480, 720) == Tiling(264, 392, 40, 64)


class OutOfMemoryUntiled:
    """Raises CUDA's out-of-memory error whenever the VAE's decoder gets whole frames ([h, w]
    latents), as a GPU too small for them does."""

    def __init__(self, vae, whole_frame: tuple[int, int]):
        self.whole_frame, self.whole = whole_frame, 0
        self.handle = vae.decoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if tuple(args[0].shape[-2:]) == self.whole_frame:
            self.whole += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")


@pytest.mark.slow
def test_out_of_memory_decodes_again_in_tiles(tiny_model, identity, text, caplog):
    from consisid_core.tiling import Tiling

    latents = sample(tiny_model, identity, text, steps=1, seed=3)
    tiled = decode(tiny_model.vae, latents, tiling=Tiling.halves(64, 96))
    oom = OutOfMemoryUntiled(tiny_model.vae, tuple(latents.shape[-2:]))
    try:
        with caplog.at_level(logging.WARNING, logger="consisid_core.sampling"):
            retried = decode(tiny_model.vae, latents)
        assert oom.whole == 1
        assert torch.equal(retried, tiled)
        assert "out of memory decoding whole frames; decoding again in 56x40 px tiles" in caplog.text
        assert tiny_model.vae.use_tiling is False
        with pytest.raises(torch.OutOfMemoryError):  # tiles the caller chose are not changed
            decode(tiny_model.vae, latents, tiling=Tiling(64, 96, 0, 0))
    finally:
        oom.handle.remove()


def test_decode_memory_follows_frame_batches_tiles_and_dtype(tiny_model):
    """The room the VAE Decode node asks ComfyUI for: diffusers decodes 3 latent frames at a time,
    and one tile at a time with tiling."""
    from consisid_core.memory import decode_memory
    from consisid_core.tiling import Tiling

    vae = tiny_model.vae.config, torch.float32
    whole = decode_memory(*vae, (1, 13, 4, 60, 90))
    assert whole == decode_memory(*vae, (1, 3, 4, 60, 90)) == 3 * decode_memory(*vae, (1, 1, 4, 60, 90))
    tiled = decode_memory(*vae, (1, 13, 4, 60, 90), Tiling.halves(480, 720))
    assert 0.25 < tiled / whole < 0.4  # tiles a little over half the frame each way
    half = decode_memory(tiny_model.vae.config, torch.bfloat16, (1, 13, 4, 60, 90))
    assert half * 2 == whole


def test_sampling_memory_scales_with_tokens_and_the_first_frame(tiny_model, tiny_dir):
    """The room the sampler node asks ComfyUI for, beyond the weights."""
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.memory import sampling_memory

    configs = tiny_model.config, tiny_model.vae.config, torch.float32
    small, frames, wide = (sampling_memory(*configs, f, h, w) for f, h, w in ((9, 64, 96), (17, 64, 96), (9, 64, 192)))
    assert 0 < small <= frames and small < wide
    # the T5's room: its parameters, read from the file headers
    t5 = load_text_encoder(Checkpoint.open(tiny_dir), "fp32").model
    assert Checkpoint.open(tiny_dir).parameter_count("text_encoder") == sum(p.numel() for p in t5.parameters())


def test_latents_that_overflow_in_fp32_are_refused_without_blaming_fp16(tiny_dir, identity, text):
    """Overflowing latents stop the run with one line; only an fp16 model is told fp16 did it."""
    from consisid_core.checkpoint import Checkpoint

    model = Checkpoint.open(tiny_dir).load_model("fp32")
    with torch.no_grad():
        model.transformer.proj_out.weight.fill_(3e38)  # its sums run past float32's range
    with pytest.raises(ConsisIDError, match="overflowed") as refused:
        sample(model, identity, text, steps=1, seed=1)
    assert "fp16" not in str(refused.value) and "\n" not in str(refused.value)


CHECKS = ("resolve_size", "check_steps", "check_seed", "check_options", "check_sampling_fits", "check_run_fits")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sample", "generate", "segments", "cli"])
def test_each_check_of_a_run_is_made_once(tiny_dir, tiny_model, identity, text, tmp_path, counted_calls, how):
    """Following a run from its options to its latents, each check is made once: by `Run.prepare`,
    `with_identity`, `with_model`, `check_text` (a long video's every segment included)."""
    from consisid_core import sampling
    from consisid_core.cli import main
    from consisid_core.identity import Identity, save_identity
    from consisid_core.sampling import generate
    from consisid_core.segments import generate_segments

    for name in CHECKS:
        counted_calls.watch(sampling, name)
    counted_calls.watch(Identity, "check_compatible")
    counted_calls.watch(sampling.Run, "check_text")
    if how == "sample":
        sample(tiny_model, identity, text, steps=1)
    elif how == "generate":
        generate(tiny_model, identity, text, steps=1)
    elif how == "segments":
        list(generate_segments(tiny_model, identity, [text] * 3, steps=1))
    else:
        save_identity(identity, tmp_path / "me.safetensors")
        assert main(["generate", "--model", str(tiny_dir), "--identity", str(tmp_path / "me.safetensors"),
                     "--prompt", "a", "--prompt", "b", "--segments", "2", "--steps", "1", "--device", "cpu",
                     "--out", str(tmp_path / "frames")]) == 0
    texts = {"segments": 3, "cli": 2}.get(how, 1)
    room = {"check_run_fits": 1} if how == "cli" else {"check_sampling_fits": 1}  # before the load, or after
    assert counted_calls == {"resolve_size": 1, "check_steps": 1, "check_seed": 1, "check_compatible": 1, "check_options": 1,
                     "check_text": texts, **room}
