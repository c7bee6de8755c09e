"""VAE decode: a ConsisID LATENT -> an IMAGE batch [F, H, W, 3] for the native video nodes."""

from __future__ import annotations

from ..consisid_core.checks import check_latent
from ..consisid_core.memory import decode_memory
from ..consisid_core.tiling import MAX_TILE, Tiling
from ..consisid_core.sampling import decode
from . import managed
from .declared import CONSISID_MODEL, FRAMES_TOOLTIP

TILES = Tiling()
"""The core's default tiles and overlaps (diffusers' for CogVideoX at 480x720)."""
LATENT_FIX = "connect the LATENT of ConsisID Sampler, and decode it with the same model"


class ConsisIDVAEDecode:
    DISPLAY_NAME = "ConsisID VAE Decode"
    DESCRIPTION = (
        "Decodes a ConsisID video latent with the model's CogVideoX VAE into frames (IMAGE batch), "
        "for Create Video, upscalers and frame interpolators. Tiling lowers memory at large sizes; out of "
        "memory without it, the frames are decoded again in tiles."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = (FRAMES_TOOLTIP,)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (CONSISID_MODEL, {"tooltip": "From ConsisID Model Loader (its VAE is used)."}),
                "latent": ("LATENT", {"tooltip": "From ConsisID Sampler."}),
                "tiling": ("BOOLEAN", {"default": False, "tooltip": "Decode in overlapping tiles: less memory, same size."}),
                "tile_height": ("INT", {"default": TILES.tile_height, "min": 16, "max": MAX_TILE, "step": 8,
                                        "tooltip": "Tile height in pixels (multiple of 8)."}),
                "tile_width": ("INT", {"default": TILES.tile_width, "min": 16, "max": MAX_TILE, "step": 8,
                                       "tooltip": "Tile width in pixels (multiple of 8)."}),
                "overlap_height": ("INT", {"default": TILES.overlap_height, "min": 0, "max": 1024, "step": 8,
                                           "tooltip": "Pixels each tile overlaps the tiles above and below it, "
                                                      "blended (multiple of 8)."}),
                "slicing": ("BOOLEAN", {"default": False,
                                        "tooltip": "Decode the videos of a batch one at a time (less memory for batches)."}),
            },
            # last, so that workflows saved with one overlap (where overlap_height now is) still load
            "optional": {
                "overlap_width": ("INT", {"default": TILES.overlap_width, "min": 0, "max": 1024, "step": 8,
                                          "tooltip": "Pixels each tile overlaps the tiles beside it, blended "
                                                     "(multiple of 8)."}),
            },
        }

    def decode(self, model, latent, tiling, tile_height=TILES.tile_height, tile_width=TILES.tile_width,
               overlap_height=TILES.overlap_height, slicing=False, overlap_width=TILES.overlap_width):
        samples = latent.get("samples") if isinstance(latent, dict) else latent
        check_latent(samples, model.vae.config.latent_channels, 1, LATENT_FIX)
        latents = samples.permute(0, 2, 1, 3, 4)
        tiles = Tiling(tile_height, tile_width, overlap_height, overlap_width) if tiling else None
        work = decode_memory(model.vae.config, model.vae.dtype, latents.shape, tiles)
        device, move_models = managed.load([("vae", model.vae)], managed.owner(model), memory_required=work)
        try:
            frames = decode(model.vae, latents, device, tiling=tiles, slicing=slicing, move_models=move_models)
        finally:
            managed.after_run()
        return (frames,)


NODES = {"ConsisIDVAEDecode": ConsisIDVAEDecode}
