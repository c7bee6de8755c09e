"""Errors that carry a message meant for the person running ConsisID."""


class ConsisIDError(ValueError):
    """Bad input: the message names the value and the fix. Callers show it as one line."""


class CheckpointError(ConsisIDError):
    """A folder or file is not a ConsisID checkpoint (or a part of one) we can load."""


class IdentityError(ConsisIDError):
    """An identity (or its file) does not have the keys or shapes a checkpoint needs."""


class RankError(ConsisIDError):
    """A refusal that one process of a `--parallel` run makes and the others do not (its own GPU):
    each process that makes it says it, where a refusal of every rank is said by rank 0 alone."""


class GenerationCancelled(Exception):
    """Raised by a step callback to stop a run; models are put back and nothing is written."""


class FaceError(ConsisIDError):
    """A face photo or a face model file cannot be used (no face, missing file, unknown provider)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """What a dependency's exception says, for a one-line message: its first line (cut after
    `limit` characters), or its type's name when it says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
