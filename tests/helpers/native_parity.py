"""The native path against our Sampler, in-process in ComfyUI v0.33 on the CPU: one tiny native
checkpoint loaded both ways (`setup`), and the latents of each for the same noise and first frame."""

import pytest
import torch

from native_tools import import_comfyui

SEED, FRAMES, HEIGHT, WIDTH, GUIDANCE = 3, 9, 64, 96, 6.0
TOLERANCE = 1e-4
SAME_MODEL = 1e-5
"""One model loaded two ways (the exported files, the native loader) on the CPU: fp32 rounding only."""


@pytest.fixture(scope="module")
def setup(native_tiny_dir):
    pack = import_comfyui()
    from consisid_core.checkpoint import Checkpoint
    from consisid_core.text import TextEmbeddings
    from consisid_core.tiny import random_identity

    folder = native_tiny_dir
    wrapper = Checkpoint.open(folder).load_model("fp32")
    g = torch.Generator().manual_seed(0)
    width = wrapper.config.text_embed_dim
    text = TextEmbeddings(torch.randn(1, 226, width, generator=g), torch.randn(1, 226, width, generator=g))
    identity = random_identity(wrapper.config, seed=7)
    from consisid_pack.nodes.native.nodes import native_model

    return dict(pack=pack, folder=folder, wrapper=wrapper, text=text, identity=identity,
                model=native_model(folder, torch.float32))


def reference_latents(setup, steps, scheduler="ddim", **options):
    """Our Sampler's latents (diffusers' ConsisIDPipeline) for the setup."""
    from consisid_core.sampling import sample

    return sample(setup["wrapper"], setup["identity"], setup["text"], seed=SEED, steps=steps, cfg=GUIDANCE,
                  scheduler=scheduler, length=FRAMES, height=HEIGHT, width=WIDTH, device="cpu", **options)


def first_latent(setup):
    """The first frame's latent as the reference makes it (the pipeline's own prepare_latents:
    the VAE posterior sampled from the seed's generator), in VAE space ([1, C, 1, h, w]); made once
    per setup (the released-size VAE takes seconds)."""
    if "first_latent" not in setup:
        setup["first_latent"] = _encode_first_latent(setup)
    return setup["first_latent"]


def _encode_first_latent(setup):
    from consisid_core.sampling import _pipeline, first_frame, make_scheduler

    wrapper = setup["wrapper"]
    pipe = _pipeline(wrapper.vae, wrapper.transformer, make_scheduler(wrapper, "ddim"))
    image = pipe.video_processor.preprocess(first_frame(None, setup["identity"]), height=HEIGHT, width=WIDTH)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents, image_latents = pipe.prepare_latents(
        image.float(), 1, 16, FRAMES, HEIGHT, WIDTH, torch.float32, torch.device("cpu"), generator, None)
    return latents, image_latents[:, :1].permute(0, 2, 1, 3, 4) / wrapper.vae.config.scaling_factor


def native_latents(setup, steps, sampler="ddim", model=None, strength=1.0, start=0.0, end=1.0, noise=None, cfg=GUIDANCE):
    """SamplerCustomAdvanced's work: CFGGuider + a sampler (a core sampler's name, or a SAMPLER
    object) + BasicScheduler(simple) + a NOISE; the latents in our Sampler's layout and scale."""
    import comfy.samplers
    from consisid_pack.nodes.native.comfy_parts import ReferenceNoise
    from consisid_pack.nodes.native.nodes import identity_conditioned

    model = model or setup["model"]
    _, first = first_latent(setup)
    text = setup["text"]
    positive, negative = identity_conditioned([[text.positive, {}]], [[text.negative, {}]], setup["identity"], first,
                                              strength, start, end)
    latent = {"samples": torch.zeros(1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)}
    noise = noise if noise is not None else ReferenceNoise(SEED).generate_noise(latent)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    sampler = comfy.samplers.sampler_object(sampler) if isinstance(sampler, str) else sampler
    out = guider.sample(noise, latent["samples"], sampler, sigmas, seed=SEED,
                        disable_pbar=True)
    return (out * setup["wrapper"].vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # our Sampler's layout and scale
