"""The refusal every bad input gets: one line, the pack's `ConsisIDError`, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consisid_core.errors import ConsisIDError


def folder_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """Everything under `root` (links not followed): its size, modification time and, for a link, its target."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, os.readlink(p) if p.is_symlink() else "")
        for p in sorted(root.rglob("*"))
    }


def assert_refused(call, match: str | None = None, error: type[Exception] = ConsisIDError, *, exact: bool = False,
                   unchanged: Path | None = None) -> str:
    """`call()` raises `error` (exactly that class when `exact`, else it or a subclass) with one line
    of printable text, no traceback, that the regular expression `match` finds (when given); nothing
    under the folder `unchanged` is written, changed or removed. Returns the message."""
    before = folder_state(unchanged) if unchanged else None
    with pytest.raises(error, match=match) as caught:
        call()
    assert not exact or type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    assert message.strip() and message.isprintable() and "Traceback" not in message, repr(message)
    if unchanged:
        assert folder_state(unchanged) == before, "a refused call wrote, changed or removed a file"
    return message
