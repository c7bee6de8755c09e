"""Progress and Cancel: ComfyUI's progress bar with a latent preview (as its own samplers show one)
and its Cancel button, reached through `fence`; outside ComfyUI there is no bar and nothing to cancel."""

from __future__ import annotations

import torch

from . import fence
from .fence import comfy, model_management


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    if fence.works("cancel"):
        model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (each update is also a Cancel point), with a latent preview when
    ComfyUI's `--preview-method` is not `none`, as its own samplers; nothing outside ComfyUI."""

    def __init__(self, total: int):
        self._bar = comfy.utils.ProgressBar(total) if fence.works("progress") else None
        self._previews = fence.works("previews") and comfy.cli_args.args.preview_method != (
            comfy.cli_args.LatentPreviewMethod.NoPreviews
        )
        self.total = total

    def update(self, value: int, latents: torch.Tensor | None = None) -> None:
        check_interrupted()
        if self._bar is not None:
            preview = _preview(latents, comfy.cli_args.args.preview_size) if self._previews and latents is not None else None
            self._bar.update_absolute(value, self.total, preview)


def _preview(latents: torch.Tensor, size: int) -> tuple:
    """A cheap look at the first latent frame of [B, F, C, h, w] latents: three channels stretched
    to 0..255, 8x up (the VAE's spatial factor); ComfyUI shrinks it to `size` on the long side."""
    from PIL import Image

    frame = latents[0, 0, :3].float()
    low, high = frame.amin(dim=(1, 2), keepdim=True), frame.amax(dim=(1, 2), keepdim=True)
    pixels = ((frame - low) / (high - low + 1e-6) * 255).byte().permute(1, 2, 0).cpu().numpy()
    return "JPEG", Image.fromarray(pixels).resize((pixels.shape[1] * 8, pixels.shape[0] * 8)), size
