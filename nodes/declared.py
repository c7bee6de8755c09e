"""The checks ComfyUI skips: for every input a node's `VALIDATE_INPUTS` takes, ComfyUI no longer
checks the declared minimum, maximum or list of choices, so the node does it here."""

from __future__ import annotations

import math


def declared_error(node_class, **values) -> str | None:
    """The first value outside what `node_class.INPUT_TYPES()` declares for it, as one line."""
    types = node_class.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    for name, value in values.items():
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                return f"{name} '{short(value)}' is not one of the choices; pick one from the list (refresh it after adding files)"
        elif kind in ("INT", "FLOAT"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if not number or (kind == "INT" and float(value) != int(value)) or not low <= value <= high:
                return f"{name} {short(value)} must be {'a whole number' if kind == 'INT' else 'a number'} from {low} to {high}"
    return None


def short(value, limit: int = 120) -> str:
    """A value as shown in a message: long text cut, so that a message stays one readable line."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
