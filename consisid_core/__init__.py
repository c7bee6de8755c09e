"""ConsisID identity-preserving text-to-video, as a plain library (no ComfyUI import).

Loading (`checkpoint` for a folder, `single_file` for single files), identities (`identity`,
`face`), text (`text`), sampling and decoding (`sampling`), long videos (`segments`), tiny
checkpoints for tests and demos (`tiny`), and the command line (`cli`).
"""

from .checkpoint import Checkpoint, ConsisIDModel
from .errors import CheckpointError, ConsisIDError, GenerationCancelled, IdentityError
from .identity import Identity, load_identity, save_identity
from .sampling import Run, RunOptions, decode, generate, prepare_run, sample
from .segments import generate_segments
from .single_file import load_transformer_file
from .text import TextEmbeddings, TextEncoder, encode_text

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConsisIDError",
    "ConsisIDModel",
    "GenerationCancelled",
    "Identity",
    "IdentityError",
    "Run",
    "RunOptions",
    "TextEmbeddings",
    "TextEncoder",
    "decode",
    "encode_text",
    "generate",
    "generate_segments",
    "load_identity",
    "load_transformer_file",
    "prepare_run",
    "sample",
    "save_identity",
]
