"""The native path: ConsisID as a ComfyUI MODEL on core's CogVideoX, identity as conditioning.

`comfy_parts` alone touches ComfyUI here; `nodes` are the nodes."""
