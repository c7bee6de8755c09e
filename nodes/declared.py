"""The checks ComfyUI skips: for every input a node's `VALIDATE_INPUTS` takes, ComfyUI no longer
checks the declared minimum, maximum or list of choices, so the node does it here.

ComfyUI shows what `VALIDATE_INPUTS` returns under every input it takes. The native nodes'
`VALIDATE_INPUTS` therefore take one input each (a file name, whose message is that input's
alone); their numbers are left to ComfyUI's own per-input bounds and checked again, NaN and all,
when the node runs (`consisid_core.checks`), before any work."""

from __future__ import annotations

import math

from ..consisid_core.files import shown


def declared_error(node_class, **values) -> str | None:
    """The first value outside what `node_class.INPUT_TYPES()` declares for it, as one line."""
    types = node_class.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    for name, value in values.items():
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                return f"{name} '{shown(value)}' is not one of the choices; pick one from the list (refresh it after adding files)"
        elif kind in ("INT", "FLOAT"):
            # ints stay ints: a huge one (JSON allows 10**400) would overflow a float
            number = not isinstance(value, bool) and (
                isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
            )
            whole = number and (isinstance(value, int) or value.is_integer())
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if not number or (kind == "INT" and not whole) or not low <= value <= high:
                return f"{name} {shown(value)} must be {'a whole number' if kind == 'INT' else 'a number'} from {low} to {high}"
    return None
