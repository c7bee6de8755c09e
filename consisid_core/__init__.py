"""ConsisID identity-preserving text-to-video, as a plain library (no ComfyUI import).

Loading (`checkpoint`), identities (`identity`, `face`), text (`text`), sampling and decoding
(`sampling`), long videos (`segments`), tiny checkpoints for tests and demos (`tiny`), and the command line (`cli`).
"""

from .checkpoint import Checkpoint, ConsisIDModel, load_transformer_file
from .errors import CheckpointError, ConsisIDError, GenerationCancelled, IdentityError
from .identity import Identity, load_identity, save_identity
from .sampling import RunOptions, decode, generate, sample
from .segments import generate_segments
from .text import TextEmbeddings, TextEncoder, encode_text

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConsisIDError",
    "ConsisIDModel",
    "GenerationCancelled",
    "Identity",
    "IdentityError",
    "RunOptions",
    "TextEmbeddings",
    "TextEncoder",
    "decode",
    "encode_text",
    "generate",
    "generate_segments",
    "load_identity",
    "load_transformer_file",
    "sample",
    "save_identity",
]
