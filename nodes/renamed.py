"""Inputs that took core ComfyUI's names (docs/dev/architecture.md, "Vocabulary"), and what keeps a
prompt made before the rename running: `old_names_renamed` gives a queued prompt's old input names
their new ones before ComfyUI validates it (`register`, through `fence.on_prompt`).

A workflow file in the UI format needs nothing more: its widget values are positional, so they land
in the renamed widgets; an input socket saved under its old name reaches /prompt under that name,
and is renamed here.
"""

from __future__ import annotations

import logging

from . import fence

logger = logging.getLogger(__name__)

RENAMED = {
    "ConsisIDSampler": {"guidance": "cfg", "frames": "length", "image": "start_image"},
    "ConsisIDExtend": {"guidance": "cfg", "frames": "length"},
    "ConsisIDFaceModules": {"face_modules": "face_layers"},
}
"""node id -> {old input name: new input name}."""


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2


def old_names_renamed(prompt) -> list[str]:
    """Renames, in place, the old input names of ConsisID nodes in `prompt` (API format, as /prompt
    takes it) to the new ones; what was renamed, one line per node. An old name beside its new one
    gives way, unless it is a link and the new one a plain value (a socket saved under the old name,
    next to the widget's own value)."""
    said = []
    for node_id, node in (prompt.items() if isinstance(prompt, dict) else ()):
        renames = RENAMED.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if renames else None
        if not isinstance(inputs, dict):
            continue
        found = [(old, new) for old, new in renames.items() if old in inputs]
        for old, new in found:
            value = inputs.pop(old)
            if new not in inputs or (_is_link(value) and not _is_link(inputs[new])):
                inputs[new] = value
        if found:
            names = ", ".join(f"{old} -> {new}" for old, new in found)
            said.append(f"ConsisID: node {node_id} ({node['class_type']}) uses old input names, taken as the new "
                        f"ones ({names}); save the workflow again to store the new names")
    return said


def _on_prompt(json_data):
    """ComfyUI's on-prompt handler: `json_data["prompt"]` with the old input names renamed."""
    for line in old_names_renamed(json_data.get("prompt") if isinstance(json_data, dict) else None):
        logger.warning(line)
    return json_data


def register() -> None:
    """Rename old input names in every prompt queued (called once, by the pack's __init__)."""
    fence.on_prompt(_on_prompt)
