"""Identity score: how well frames keep the identity's face (FaceSim-Arc, ConsisID's own measure)."""

from __future__ import annotations

import numpy as np
import torch

from ..consisid_core.score import DEFAULT_FRAMES_SAMPLED, MAX_FRAMES_SAMPLED, SampledFrames, identity_embedding, plot
from . import progress
from .declared import CONSISID_FACE_MODELS, CONSISID_IDENTITY, image_batch

MAX_FRAMES_PER_SEGMENT = 10_000


class ConsisIDIdentityScore:
    DISPLAY_NAME = "ConsisID Identity Score"
    DESCRIPTION = (
        "Scores how well a video keeps the identity's face: FaceSim-Arc, as ConsisID's own evaluation "
        "(eval/get_facesim_fid.py) measures it. Evenly spaced frames, the antelopev2 embedding of the largest "
        "face in each, cosine similarity with the identity's embedding clipped at 0; frames without a face are "
        "skipped (0 when none has one). Around 0.5 and above the face is well kept; compare seeds and settings "
        "on the same identity rather than reading one number alone."
    )
    CATEGORY = "ConsisID"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("facesim_arc", "per_frame", "plot")
    OUTPUT_TOOLTIPS = (
        "The mean score over the sampled frames with a face (0 to 1; 0 when no frame has a face).",
        "One line per sampled frame ('frame 12: 0.4123' or 'frame 12: no face'), after a summary line.",
        "A chart of the score per sampled frame (red crosses: no face; grey lines: segment starts; dashed: the mean).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The video's frames, e.g. from ConsisID VAE Decode."}),
                "face_models": (CONSISID_FACE_MODELS, {"tooltip": "From ConsisID Face Models Loader (the same "
                                                                    "checkpoint's as made the identity)."}),
                "identity": (
                    CONSISID_IDENTITY, {"tooltip": "The identity to look for: its embedding is the reference."}
                ),
                "frames_sampled": (
                    "INT",
                    {"default": DEFAULT_FRAMES_SAMPLED, "min": 1, "max": MAX_FRAMES_SAMPLED,
                     "tooltip": "Evenly spaced frames scored; the official protocol uses 16."},
                ),
            },
            "optional": {
                "frames_per_segment": (
                    "INT",
                    {"default": 0, "min": 0, "max": MAX_FRAMES_PER_SEGMENT,
                     "tooltip": "For a long video of chained segments (each starting on the previous one's last "
                                "frame, shown once): the frames of one segment, e.g. 49, to mark where segments "
                                "start on the plot and give each segment's mean of the sampled frames within it. "
                                "0: one video."},
                ),
            },
        }

    def score(self, frames: torch.Tensor, face_models, identity, frames_sampled: int, frames_per_segment: int = 0):
        frames = image_batch(frames, "frames input", "the frames of a video (VAE Decode's)")
        reference = identity_embedding(identity, face_models)
        kept = SampledFrames(len(frames), frames_per_segment, frames_sampled)
        kept.add(frames)
        bar = progress.Progress(kept.looked_at)
        parts, result = kept.scores(face_models, reference, progress=bar.update)
        lines = [result.summary()]
        if len(parts) > 1:
            lines += [f"segment {k} (frames {first}-{last}): {part.summary()}"
                      for k, (part, (first, last)) in enumerate(zip(parts, kept.bounds), 1)]
        lines.append(result.per_frame())
        picture = np.asarray(plot(result, [first for first, _ in kept.bounds[1:]]), dtype=np.float32) / 255.0
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (result.mean, text, torch.from_numpy(picture).unsqueeze(0))}


NODES = {"ConsisIDIdentityScore": ConsisIDIdentityScore}
