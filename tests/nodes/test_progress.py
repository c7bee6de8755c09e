"""nodes/progress.py: the latent preview's picture; inside ComfyUI (in-process) the bar's updates reach
ComfyUI's progress hook and Cancel stops at the next update (Cancel in a served run: test_comfyui.py)."""

import pytest
import torch

from native_tools import import_comfyui
from node_tools import NEEDS_COMFYUI
from workflow_tools import import_pack

import_pack()
from consisid_pack.nodes.progress import _preview  # noqa: E402


def test_the_preview_is_the_first_frames_three_channels_stretched_and_8x_up():
    latents = torch.randn(1, 2, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    kind, picture, size = _preview(latents, 256)
    assert (kind, size, picture.size, picture.mode) == ("JPEG", 256, (56, 40), "RGB")
    pixels = torch.tensor(list(picture.getdata()), dtype=torch.float32).reshape(40, 56, 3)
    for channel in range(3):  # each channel stretched to 0..255 (resizing smooths the extremes a little)
        assert pixels[..., channel].min() <= 10 and pixels[..., channel].max() >= 245
    first = latents[0, 0, 0]
    for value, bright in ((first.max(), True), (first.min(), False)):  # the latent's extremes, where they are
        row, column = divmod((first == value).flatten().nonzero().item(), 7)
        centre = pixels[row * 8 + 3: row * 8 + 5, column * 8 + 3: column * 8 + 5, 0].mean()
        assert centre >= 200 if bright else centre <= 55


@pytest.mark.comfyui
@pytest.mark.slow  # imports ComfyUI in-process: seconds
@NEEDS_COMFYUI
def test_inside_comfyui_updates_reach_the_bar_and_cancel_stops_the_next():
    import_comfyui()
    import comfy.model_management
    import comfy.utils

    from consisid_pack.nodes import progress

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *_args, **_kwargs: seen.append(
        (value, total, preview)))
    try:
        bar = progress.Progress(4)
        bar.update(1, torch.zeros(1, 1, 16, 2, 2))
        bar.update(4)  # (ComfyUI may skip updates between the first and the last)
        assert [(value, total) for value, total, _ in seen] == [(1, 4), (4, 4)]
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            bar.update(2)
        assert len(seen) == 2
        comfy.model_management.interrupt_current_processing(True)  # (the raise above took the first press)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            progress.check_interrupted()
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
