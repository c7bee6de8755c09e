"""The sampler: identity + text (+ first frame) -> a video LATENT."""

from __future__ import annotations

from ..consisid_core.memory import sampling_memory
from ..consisid_core.performance import ATTENTION_BACKENDS, OFFLOAD_MODES, Performance
from ..consisid_core.sampling import MAX_GUIDANCE, SCHEDULERS, prepare_run
from . import managed, progress
from .declared import (
    CONSISID_IDENTITY, CONSISID_MODEL, CONSISID_PERFORMANCE, CONSISID_TEXT, FIRST_IMAGE_TOOLTIP, FRAME_COUNT_TOOLTIP,
    IDENTITY_TOOLTIP, TEXT_TOOLTIP, declared_error, first_image, height_input, identity_strength_input, length_input,
    seed_input, step_cache_input, width_input,
)


def check_size(length: int, width: int, height: int) -> str | bool:
    """ComfyUI's validation before a run, from the inputs alone, with no model (the prepared run
    checks the size against the model's configs)."""
    if length < 1 or (length - 1) % 4:
        return f"length {length} must be 4·k + 1 (49 for ConsisID; e.g. {max(1, (length - 1) // 4 * 4 + 1)})"
    for name, value in (("width", width), ("height", height)):
        if value < 16 or value % 16:
            return f"{name} {value} must be a positive multiple of 16 (ConsisID: 720 x 480)"
    return True


class ConsisIDSampler:
    DISPLAY_NAME = "ConsisID Sampler"
    DESCRIPTION = (
        "Generates a ConsisID video latent: the identity, the text and a first frame (by default the "
        "identity's aligned face, as the reference), denoised with diffusers' ConsisIDPipeline. "
        "Progress bar and Cancel work mid-run; options apply to this run only."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Video latents [1, channels, latent frames, h, w]; decode with ConsisID VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (CONSISID_MODEL, {"tooltip": "From ConsisID Model Loader."}),
                "identity": (CONSISID_IDENTITY, {"tooltip": IDENTITY_TOOLTIP}),
                "text": (CONSISID_TEXT, {"tooltip": TEXT_TOOLTIP}),
                "seed": seed_input(),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps (reference: 50)."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": MAX_GUIDANCE, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (reference: 6.0); 1 or less turns it off."}),
                "dynamic_cfg": ("BOOLEAN", {"default": False, "tooltip": "The reference's cosine guidance schedule."}),
                "scheduler": (list(SCHEDULERS), {"default": "dpm", "tooltip": "dpm as the reference (CogVideoX DPM), or ddim."}),
                "length": length_input(f"{FRAME_COUNT_TOOLTIP} 8·k + 1 (9, 17, …, 49) decode to exactly as many; "
                                       "other counts to more, as in diffusers."),
                "width": width_input(),
                "height": height_input(),
                "identity_strength": identity_strength_input("Scale of the face features (the transformer's "
                                                             "local_face_scale)."),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": FIRST_IMAGE_TOOLTIP}),
                "performance": (CONSISID_PERFORMANCE, {"tooltip": "Speed and memory options from ConsisID Performance."}),
                "allow_oversize": ("BOOLEAN", {"default": False,
                                               "tooltip": "Allow more than 8x the checkpoint's frames or 4x its pixels per "
                                                          "frame in one pass (runs that cannot fit in memory are still refused)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, length: int, width: int, height: int):
        return declared_error(cls, length=length, width=width, height=height) or check_size(length, width, height)

    def sample(self, model, identity, text, seed, steps, cfg, dynamic_cfg, scheduler, length, width, height,
               identity_strength, start_image=None, performance=None, allow_oversize=False):
        first = first_image(start_image, "start_image")
        owner = managed.owner(model)
        # every check of the run, before ComfyUI is asked for room
        run = prepare_run(
            model, identity, text, first,
            seed=seed, steps=steps, cfg=cfg, dynamic_cfg=dynamic_cfg, scheduler=scheduler,
            length=length, height=height, width=width, identity_strength=identity_strength,
            device=managed.torch_device(), performance=performance, allow_oversize=allow_oversize,
            move_models=owner is None,
        )
        streamed = run.options.performance.offload == "sequential"
        bar = progress.Progress(steps)
        if streamed:  # the core streams the transformer's layers itself, from where ComfyUI keeps it
            managed.unload(owner, model.transformer)
        parts = ([] if streamed else [("transformer", model.transformer)]) + [("vae", model.vae)]
        work = sampling_memory(model.config, model.vae.config, model.dtype, *run.size)
        device, move_models = managed.load(parts, owner, memory_required=work)
        # else ComfyUI patched the LoRAs in when it loaded the transformer
        merge_loras = move_models or streamed or not managed.merges_loras_itself()
        try:
            latents = run.placed(device, move_models, merge_loras).sample(
                text, callback=lambda step, total, latents: bar.update(step, latents)
            )
        finally:
            managed.after_run()
        return ({"samples": latents.permute(0, 2, 1, 3, 4).contiguous()},)


class ConsisIDPerformance:
    DISPLAY_NAME = "ConsisID Performance"
    DESCRIPTION = (
        "Speed and memory options for ConsisID Sampler, for its run only: torch.compile, streaming the "
        "transformer's layers to the GPU (least memory), TeaCache step caching and SageAttention."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "options"
    RETURN_TYPES = (CONSISID_PERFORMANCE,)
    RETURN_NAMES = ("performance",)
    OUTPUT_TOOLTIPS = ("Connect to ConsisID Sampler's performance input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "compile": ("BOOLEAN", {"default": False,
                                        "tooltip": "torch.compile the transformer blocks: faster steps after a slow first run."}),
                "offload": (list(OFFLOAD_MODES), {"default": "model",
                                                  "tooltip": "model: ComfyUI places the transformer on the GPU (whole, or what fits, "
                                                             "streaming the rest) and keeps it there between runs. sequential: its "
                                                             "layers stream in one at a time (least VRAM, slower)."}),
                "step_cache": step_cache_input(),
                "attention": (list(ATTENTION_BACKENDS), {"default": "sdpa",
                                                         "tooltip": "sdpa: PyTorch's attention, as diffusers. sage: SageAttention's "
                                                                    "quantized kernel (pip install sageattention; CUDA, bf16/fp16 model): "
                                                                    "faster, results move slightly."}),
            }
        }

    def options(self, compile: bool, offload: str, step_cache: float, attention: str = "sdpa"):
        return (Performance(compile=compile, offload=offload, step_cache=step_cache, attention=attention),)


NODES = {"ConsisIDSampler": ConsisIDSampler, "ConsisIDPerformance": ConsisIDPerformance}
