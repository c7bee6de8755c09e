"""The reference of the parity tests: what diffusers' `ConsisIDPipeline` makes of the same tiny
weights and identity, and the tolerance our frames keep to it."""

import torch
from diffusers import ConsisIDPipeline

TOLERANCE = 1e-4
PROMPT = "a woman smiling in a sunny park, the camera slowly moves closer"
NEGATIVE = "blurry, low quality"


def reference_frames(folder, identity, image=None, **kw) -> torch.Tensor:
    """What diffusers makes of it: frames [F, H, W, 3] float32."""
    pipe = ConsisIDPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=image if image is not None else identity.face_image_pil(),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=kw.get("steps", 4),
        guidance_scale=kw.get("guidance_scale", 6.0),
        use_dynamic_cfg=kw.get("dynamic_cfg", False),
        generator=torch.Generator("cpu").manual_seed(kw.get("seed", 42)),
        id_cond=identity.id_cond,
        id_vit_hidden=list(identity.id_vit_hidden),
        kps_cond=identity.kps.numpy(),
        output_type="pt",
        # the pipeline's own defaults are the real checkpoint's 480x720x49; ours are the checkpoint's
        height=64,
        width=96,
        num_frames=9,
    ).frames
    return out[0].permute(0, 2, 3, 1)
