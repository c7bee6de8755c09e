"""The shipped workflows: how they are built, checked against node specs, and turned into API format.

`python tests/helpers/workflow_tools.py` writes workflows/*.json (UI format, the files a person drags into
ComfyUI). Node specs are ComfyUI's /object_info entries: ours are made from the node classes, the
core and third-party ones are a snapshot in tests/data/comfyui_node_specs.json (ComfyUI a125cd8,
ComfyUI-Frame-Interpolation's RIFE VFI; the native workflows' core nodes and CLIPLoader from ComfyUI
v0.33.0's /object_info, model lists empty).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
HELPERS = Path(__file__).resolve().parent
DATA = ROOT / "tests" / "data"
COMFY_SCRIPTS = ROOT / "tests" / "comfyui"
"""The scripts that real-ComfyUI tests run in ComfyUI's folder (`comfy_*.py`)."""
SNAPSHOT = DATA / "comfyui_node_specs.json"
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
"""A combo whose chosen option brings inputs of its own (ComfyUI's V3 API; Save Video's format from v0.33)."""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
THIRD_PARTY = {"RIFE VFI": "ComfyUI-Frame-Interpolation"}
IMAGE_PREVIEW = 200  # room below an upload widget for the image preview (LoadImage)

PROMPT = (
    "The video shows a woman walking along a quiet city street at golden hour, filmed on a classic 35mm "
    "camera. She smiles softly at the camera; the wind moves her hair, and warm light falls across her "
    "face. Shop windows and softly blurred passers-by fill the background."
)
CHECKPOINT = "ConsisID-preview"
LORAS = (("consisid_style_lora.safetensors", 1.0), ("consisid_subject_lora.safetensors", 0.8))
"""The LoRA workflow's two stacked LoRAs (names to replace with your own files in models/loras)."""


def script_env(comfyui: str) -> dict:
    """The environment of a script run in ComfyUI's folder (`tests/comfyui/comfy_*.py`): ComfyUI's
    modules and these helpers importable, beside what the caller's PYTHONPATH has."""
    path = [comfyui, str(HELPERS), os.environ.get("PYTHONPATH")]
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, path))}


def import_pack():
    """The repo imported as ComfyUI does: its __init__.py as a package (here named consisid_pack)."""
    if "consisid_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "consisid_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["consisid_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["consisid_pack"]


def our_specs() -> dict:
    """Our nodes as /object_info shows them (JSON round trip: tuples become lists)."""
    import_pack()
    from consisid_pack.nodes import NODE_CLASS_MAPPINGS

    specs = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        specs[name] = {
            "input": inputs,
            "input_order": {group: list(values) for group, values in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        }
    return json.loads(json.dumps(specs))


def all_specs() -> dict:
    return json.loads(SNAPSHOT.read_text()) | our_specs()


def _declared(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input, in the order the frontend makes widgets."""
    return _inputs(spec["input"], spec.get("input_order", {}))


def _inputs(groups: dict, order: dict) -> list[tuple[str, str, dict]]:
    result = []
    for group in ("required", "optional"):
        declared = groups.get(group, {})
        for name in order.get(group, list(declared)):
            kind, *rest = declared[name]
            options = rest[0] if rest else {}
            result.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return result


def _default(spec: dict, name: str, kind: str, options: dict):
    """The value a new widget starts with in the frontend."""
    if kind == DYNAMIC_COMBO:
        return options["options"][0]["key"]
    if kind == "COMBO" and "default" not in options:
        return next(iter(_combo_options(spec, name)), None)
    return options.get("default")


def widgets(spec: dict, values: list) -> list[tuple[str, bool, object]]:
    """(input name, is a frontend-only extra, value) of each widget the frontend makes for a node
    of `spec` that holds `values` (a UI file's widgets_values), as the frontend fills them: the
    values in order, then their defaults for widgets the values do not reach (widgets a newer
    ComfyUI added since the file was written). A dynamic combo's chosen option brings its own
    inputs, named `<combo>.<input>`, right after it."""
    values = list(values)
    result = []

    def take(name: str, kind: str, options: dict, extra: bool = False):
        value = values.pop(0) if values else (None if extra else _default(spec, name, kind, options))
        result.append((name, extra, value))
        return value

    def walk(declared: list[tuple[str, str, dict]], prefix: str) -> None:
        for name, kind, options in declared:
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            value = take(prefix + name, kind, options)
            if kind == DYNAMIC_COMBO:
                chosen = next(o for o in options["options"] if o["key"] == value)
                walk(_inputs(chosen["inputs"], {}), f"{prefix}{name}.")
            if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
                take(prefix + name, kind, options, extra=True)  # the "control after generate" combo
            if options.get("image_upload"):
                take(prefix + name, kind, options, extra=True)  # the upload button

    walk(_declared(spec), "")
    return result


def _combo_options(spec: dict, name: str) -> list:
    for group in ("required", "optional"):
        if name in spec["input"].get(group, {}):
            kind, *rest = spec["input"][group][name]
            return kind if isinstance(kind, list) else (rest[0] if rest else {}).get("options", [])
    return []


def widget_slots(spec: dict) -> list[tuple[str, bool]]:
    """(input name, is an extra frontend-only value after it) for each widget value a new node
    stores (dynamic combos at their first option)."""
    return [(name, extra) for name, extra, _ in widgets(spec, [])]


# ---------------------------------------------------------------------------------------------
# building


class Graph:
    """A UI-format graph under construction; nodes are laid out in columns by depth."""

    def __init__(self, specs: dict):
        self.specs = specs
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.last_id = 0

    def _node(self, node_id: int) -> dict:
        return next(n for n in self.nodes if n["id"] == node_id)

    def skip(self) -> None:
        """Leave the next node id unused (a node a workflow no longer has keeps its id retired,
        so the others keep theirs)."""
        self.last_id += 1

    def _link(self, source: int, slot: int, target: int, target_slot: int) -> int:
        link_id = len(self.links) + 1
        origin = self._node(source)
        self.links.append([link_id, source, slot, target, target_slot, origin["outputs"][slot]["type"]])
        origin["outputs"][slot]["links"].append(link_id)
        return link_id

    def link(self, source: tuple[int, int], target: int, name: str) -> None:
        """Connect an output to a widget of a node already added; the widget keeps its value in
        widgets_values."""
        node = self._node(target)
        node["_widget_links"][name] = self._link(*source, target, None)
        node["_depth"] = max(node["_depth"], self._node(source[0])["_depth"] + 1)

    def _widget_inputs(self, node: dict) -> None:
        """A node with a linked widget gets the widgets' inputs as the frontend saves them: after the
        other inputs, one per widget in declared order, the linked ones with their link."""
        linked = node.pop("_widget_links")
        if not linked:
            return
        for name, kind, options in _declared(self.specs[node["type"]]):
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                if name in linked:
                    self.links[linked[name] - 1][4] = len(node["inputs"])
                node["inputs"].append({"name": name, "type": kind, "widget": {"name": name}, "link": linked.get(name)})

    def add(self, node_type: str, *widgets, **sockets) -> int:
        spec = self.specs[node_type]
        self.last_id += 1
        node_id = self.last_id
        depth = 0
        inputs = []
        widget_links = {}
        for name, kind, _ in _declared(spec):
            if name in sockets:
                source, slot = sockets.pop(name)
                depth = max(depth, self._node(source)["_depth"] + 1)
                if kind in WIDGET_TYPES:
                    widget_links[name] = self._link(source, slot, node_id, None)
                    continue
                link_id = self._link(source, slot, node_id, len(inputs))
                inputs.append({"name": name, "type": kind, "link": link_id})
            elif kind not in WIDGET_TYPES:
                inputs.append({"name": name, "type": kind, "link": None})
        assert not sockets, f"{node_type} has no inputs {sorted(sockets)}"
        assert len(widgets) == len(widget_slots(spec)), f"{node_type}: {len(widget_slots(spec))} widget values"
        height = 120 + 26 * len(widgets)
        if any(options.get("image_upload") for _, _, options in _declared(spec)):
            height += IMAGE_PREVIEW  # the frontend grows the node to show the picked image
        outputs = [
            {"name": name, "type": kind, "links": [], "slot_index": i}
            | ({"shape": 6} if spec.get("output_is_list", [False] * 99)[i] else {})
            for i, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))
        ]
        self.nodes.append(
            {
                "id": node_id,
                "type": node_type,
                "pos": [0, 0],
                "size": [360, height],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node_type}
                | ({"cnr_id": THIRD_PARTY[node_type]} if node_type in THIRD_PARTY else {}),
                "widgets_values": list(widgets),
                "_depth": depth,
                "_widget_links": widget_links,
            }
        )
        return node_id

    def to_json(self) -> dict:
        rows: dict[int, int] = {}
        for order, node in enumerate(self.nodes):
            self._widget_inputs(node)
            depth = node.pop("_depth")
            node["order"] = order
            node["pos"] = [40 + 420 * depth, 40 + rows.get(depth, 0)]
            rows[depth] = rows.get(depth, 0) + node["size"][1] + 60
        return {
            "last_node_id": self.last_id,
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def _tail(g: Graph, model: int, identity: tuple[int, int], text: int, fps: float, extra=None) -> None:
    """Sampler -> VAE decode -> (extra image steps) -> CreateVideo -> SaveVideo (mp4, h264)."""
    sampler = g.add(
        "ConsisIDSampler", 42, "fixed", 50, 6.0, False, "dpm", 49, 720, 480, 1.0, False,
        model=(model, 0), identity=identity, text=(text, 0),
    )
    frames = (g.add("ConsisIDVAEDecode", False, 240, 360, 40, False, 72, model=(model, 0), latent=(sampler, 0)), 0)
    if extra is not None:
        frames = extra(g, frames)
    video = g.add("CreateVideo", fps, images=frames)
    g.add("SaveVideo", "consisid/ConsisID", "mp4", "h264", video=(video, 0))


def _face_graph(specs: dict, core_t5: bool = False, extra=None, fps: float = 8.0, loras=()) -> dict:
    g = Graph(specs)
    photo = g.add("LoadImage", "consisid_face.png", "image")
    faces = g.add("ConsisIDFaceModelsLoader", CHECKPOINT, "cpu", "cpu")
    embed = g.add("ConsisIDFaceEmbed", -1, image=(photo, 0), face_models=(faces, 0))
    if extra is None and not loras:
        g.add("ConsisIDSaveIdentity", "consisid/identity", identity=(embed, 0))
    model = g.add("ConsisIDModelLoader", CHECKPOINT, "(from checkpoint)", "bf16", False)
    if core_t5:
        clip = g.add("CLIPLoader", "t5xxl_fp16.safetensors", "sd3", "default")
        text = g.add("ConsisIDTextEncode", PROMPT, "", clip=(clip, 0))
    else:
        text = g.add("ConsisIDTextEncode", PROMPT, "", model=(model, 0))
    for name, strength in loras:  # stacked: each LoRA node takes the one before
        model = g.add("ConsisIDLoRA", name, strength, model=(model, 0))
    _tail(g, model, (embed, 0), text, fps, extra)
    return g.to_json()


def _upscale_and_interpolate(g: Graph, frames: tuple[int, int]) -> tuple[int, int]:
    upscaler = g.add("UpscaleModelLoader", "RealESRGAN_x2.pth")
    upscaled = g.add("ImageUpscaleWithModel", upscale_model=(upscaler, 0), image=frames)
    return g.add("RIFE VFI", "rife47.pth", 10, 2, True, True, 1.0, frames=(upscaled, 0)), 0


def _reuse_identity(specs: dict) -> dict:
    g = Graph(specs)
    identity = g.add("ConsisIDLoadIdentity", "identity.safetensors")
    model = g.add("ConsisIDModelLoader", CHECKPOINT, "(from checkpoint)", "bf16", False)
    text = g.add("ConsisIDTextEncode", PROMPT, "", model=(model, 0))
    _tail(g, model, (identity, 0), text, 8.0)
    return g.to_json()


def _long_video(specs: dict) -> dict:
    """Three segments (Sampler, then two Extends with the seeds `generate --segments 3 --seed 42`
    gives them), then RIFE VFI to 16 fps and Save Video."""
    g = Graph(specs)
    photo = g.add("LoadImage", "consisid_face.png", "image")
    faces = g.add("ConsisIDFaceModelsLoader", CHECKPOINT, "cpu", "cpu")
    identity = (g.add("ConsisIDFaceEmbed", -1, image=(photo, 0), face_models=(faces, 0)), 0)
    model = (g.add("ConsisIDModelLoader", CHECKPOINT, "(from checkpoint)", "bf16", False), 0)
    text = (g.add("ConsisIDTextEncode", PROMPT, "", model=model), 0)
    sampler = g.add(
        "ConsisIDSampler", 42, "fixed", 50, 6.0, False, "dpm", 49, 720, 480, 1.0, False,
        model=model, identity=identity, text=text,
    )
    video = (g.add("ConsisIDVAEDecode", False, 240, 360, 40, False, 72, model=model, latent=(sampler, 0)), 0)
    for seed in (43, 44):
        video = (g.add(
            "ConsisIDExtend", seed, "fixed", 50, 6.0, False, "dpm", 49, 720, 480, 1.0, False, False,
            model=model, identity=identity, text=text, previous=video,
        ), 1)
    frames = g.add("RIFE VFI", "rife47.pth", 10, 2, True, True, 1.0, frames=video)
    clip = g.add("CreateVideo", 16.0, images=(frames, 0))
    g.add("SaveVideo", "consisid/ConsisID", "mp4", "h264", video=(clip, 0))
    return g.to_json()


NATIVE_VAE = "consisid_vae.safetensors"
"""The checkpoint's vae/diffusion_pytorch_model.safetensors, put in models/vae under this name."""
NATIVE_FILES = ("consisid_transformer.safetensors", "consisid_face.safetensors")
"""What `python -m consisid_core export --model ConsisID-preview --out models/diffusion_models` writes."""
NATIVE_LORA = "consisid_style_lora_comfy.safetensors"
"""A ConsisID LoRA after `export --lora`, in models/loras."""


def _native_head(g: Graph) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """T5 through core CLIPLoader (type cogvideox) and CLIPTextEncode, the identity from a photo, core
    VAE Loader: (positive, negative, identity, vae)."""
    clip = g.add("CLIPLoader", "t5xxl_fp16.safetensors", "cogvideox", "default")
    positive = g.add("CLIPTextEncode", PROMPT, clip=(clip, 0))
    negative = g.add("CLIPTextEncode", "", clip=(clip, 0))
    photo = g.add("LoadImage", "consisid_face.png", "image")
    faces = g.add("ConsisIDFaceModelsLoader", CHECKPOINT, "cpu", "cpu")
    identity = g.add("ConsisIDFaceEmbed", -1, image=(photo, 0), face_models=(faces, 0))
    vae = g.add("VAELoader", NATIVE_VAE)
    return (positive, 0), (negative, 0), (identity, 0), (vae, 0)


def _native_tail(g: Graph, latent: tuple[int, int], vae: tuple[int, int], decode: str = "VAEDecode") -> None:
    frames = g.add(decode, samples=latent, vae=vae)
    video = g.add("CreateVideo", 8.0, images=(frames, 0))
    g.add("SaveVideo", "consisid/ConsisID_native", "mp4", "h264", video=(video, 0))


def _native(specs: dict) -> dict:
    """ConsisID as a native MODEL in core KSampler (ddim + simple: the reference's ddim)."""
    g = Graph(specs)
    positive, negative, identity, vae = _native_head(g)
    model = g.add("ConsisIDNativeModelLoader", CHECKPOINT, "default", "off")
    conditioned = g.add("ConsisIDIdentityConditioning", 720, 480, 49, 1.0, 0.0, 1.0, -1, False,
                        positive=positive, negative=negative, identity=identity, vae=vae)
    latent = g.add("KSampler", 42, "fixed", 50, 6.0, "ddim", "simple", 1.0, model=(model, 0),
                   positive=(conditioned, 0), negative=(conditioned, 1), latent_image=(conditioned, 2))
    _native_tail(g, (latent, 0), vae)
    return g.to_json()


def _native_lora(specs: dict) -> dict:
    """The exported transformer through core Load Diffusion Model, its face layers, a LoRA through
    core LoraLoaderModelOnly, and one seed (ConsisID Seed) for the first frame, SamplerCustomAdvanced's
    noise and the reference's dpm sampler, then ConsisID Native VAE Decode (the reference's decode
    order): the CLI's and ConsisID Sampler's video for seed 42, given the same LoRA. (Node 14, the
    DPM Sampler of the three-seed version, is retired so that the other ids stay.)"""
    g = Graph(specs)
    positive, negative, identity, vae = _native_head(g)
    transformer, face = NATIVE_FILES
    model = g.add("UNETLoader", transformer, "default")
    model = g.add("ConsisIDFaceModules", face, model=(model, 0))
    model = g.add("LoraLoaderModelOnly", NATIVE_LORA, 1.0, model=(model, 0))
    conditioned = g.add("ConsisIDIdentityConditioning", 720, 480, 49, 1.0, 0.0, 1.0, 42, False,
                        positive=positive, negative=negative, identity=identity, vae=vae)
    guider = g.add("CFGGuider", 6.0, model=(model, 0), positive=(conditioned, 0), negative=(conditioned, 1))
    seed = g.add("ConsisIDSeed", 42, "fixed")
    g.link((seed, 2), conditioned, "first_frame_seed")
    g.skip()
    sigmas = g.add("BasicScheduler", "simple", 50, 1.0, model=(model, 0))
    latent = g.add("SamplerCustomAdvanced", noise=(seed, 0), guider=(guider, 0), sampler=(seed, 1),
                   sigmas=(sigmas, 0), latent_image=(conditioned, 2))
    _native_tail(g, (latent, 0), vae, decode="ConsisIDNativeVAEDecode")
    return g.to_json()


def _native_segment(g: Graph, head: tuple, model: int, sigmas: int, seed: int, start=None) -> int:
    """One segment of a native long video: its own seed, Identity Conditioning (from `start`, an
    IMAGE, when given), SamplerCustomAdvanced and ConsisID Native VAE Decode; returns the decode."""
    positive, negative, identity, vae = head
    seeds = g.add("ConsisIDSeed", seed, "fixed")
    first = {} if start is None else {"start_image": start}
    conditioned = g.add("ConsisIDIdentityConditioning", 720, 480, 49, 1.0, 0.0, 1.0, seed, False,
                        positive=positive, negative=negative, identity=identity, vae=vae, **first)
    g.link((seeds, 2), conditioned, "first_frame_seed")
    guider = g.add("CFGGuider", 6.0, model=(model, 0), positive=(conditioned, 0), negative=(conditioned, 1))
    latent = g.add("SamplerCustomAdvanced", noise=(seeds, 0), guider=(guider, 0), sampler=(seeds, 1),
                   sigmas=(sigmas, 0), latent_image=(conditioned, 2))
    return g.add("ConsisIDNativeVAEDecode", samples=(latent, 0), vae=vae)


def _native_long_video(specs: dict) -> dict:
    """Three segments on the native MODEL, each from the last frame of the video so far (core Image
    From Batch at -1), seeds 42, 43, 44 (`generate --segments 3 --seed 42`), joined by ConsisID Append
    Segment, then Create Video and Save Video."""
    g = Graph(specs)
    head = _native_head(g)
    model = g.add("ConsisIDNativeModelLoader", CHECKPOINT, "default", "off")
    sigmas = g.add("BasicScheduler", "simple", 50, 1.0, model=(model, 0))
    video = (_native_segment(g, head, model, sigmas, 42), 0)
    for seed in (43, 44):
        last = g.add("ImageFromBatch", -1, 1, image=video)
        segment = _native_segment(g, head, model, sigmas, seed, start=(last, 0))
        video = (g.add("ConsisIDAppendSegment", False, video=video, segment=(segment, 0)), 0)
    clip = g.add("CreateVideo", 8.0, images=video)
    g.add("SaveVideo", "consisid/ConsisID_native_long", "mp4", "h264", video=(clip, 0))
    return g.to_json()


NATIVE_FP8_FILES = ("consisid_fp8_transformer.safetensors", "consisid_fp8_face.safetensors")
"""What `python -m consisid_core export --model ConsisID-preview --out models/diffusion_models --name consisid_fp8
--quant float8_e4m3fn` writes."""


def _native_lowvram(specs: dict) -> dict:
    """For small cards: the transformer quantized by `export --quant float8_e4m3fn` through core Load
    Diffusion Model, its face layers, core KSampler, and core VAE Decode (Tiled), which decodes in
    256-pixel tiles."""
    g = Graph(specs)
    positive, negative, identity, vae = _native_head(g)
    transformer, face = NATIVE_FP8_FILES
    model = g.add("UNETLoader", transformer, "default")
    model = g.add("ConsisIDFaceModules", face, model=(model, 0))
    conditioned = g.add("ConsisIDIdentityConditioning", 720, 480, 49, 1.0, 0.0, 1.0, -1, False,
                        positive=positive, negative=negative, identity=identity, vae=vae)
    latent = g.add("KSampler", 42, "fixed", 50, 6.0, "ddim", "simple", 1.0, model=(model, 0),
                   positive=(conditioned, 0), negative=(conditioned, 1), latent_image=(conditioned, 2))
    frames = g.add("VAEDecodeTiled", 256, 64, 64, 8, samples=(latent, 0), vae=vae)
    video = g.add("CreateVideo", 8.0, images=(frames, 0))
    g.add("SaveVideo", "consisid/ConsisID_lowvram", "mp4", "h264", video=(video, 0))
    return g.to_json()


def build(specs: dict | None = None) -> dict[str, dict]:
    """File name -> UI-format workflow, for every shipped workflow."""
    specs = specs or all_specs()
    return {
        "consisid_basic.json": _face_graph(specs),
        "consisid_core_t5.json": _face_graph(specs, core_t5=True),
        "consisid_upscale_interpolate.json": _face_graph(specs, extra=_upscale_and_interpolate, fps=16.0),
        "consisid_reuse_identity.json": _reuse_identity(specs),
        "consisid_long_video.json": _long_video(specs),
        "consisid_lora.json": _face_graph(specs, loras=LORAS),
        "consisid_native.json": _native(specs),
        "consisid_native_lora.json": _native_lora(specs),
        "consisid_native_long_video.json": _native_long_video(specs),
        "consisid_native_lowvram.json": _native_lowvram(specs),
    }


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# checking and converting


def check(workflow: dict, specs: dict, dynamic=("LoadImage", "CLIPLoader", "UpscaleModelLoader", "VAELoader", "UNETLoader",
                                                "LoraLoaderModelOnly")) -> list[str]:
    """Problems with a UI-format workflow against node specs: unknown nodes, inputs, links of the
    wrong type, wrong widget counts, values outside their range or choices. Empty if none."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        origin = nodes[source]
        if origin["type"] in specs and specs[origin["type"]]["output"][slot] != kind:
            problems.append(f"link {link_id}: {origin['type']} output {slot} is not {kind}")
        if nodes[target]["inputs"][target_slot]["link"] != link_id:
            problems.append(f"link {link_id} does not end where it says")
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        spec = specs.get(node["type"])
        if spec is None:
            problems.append(f"{where}: no such node")
            continue
        declared = {name: (kind, options) for name, kind, options in _declared(spec)}
        for socket in node.get("inputs", []):
            if socket["name"] not in declared:
                problems.append(f"{where}: no input '{socket['name']}'")
            elif socket["link"] is not None and declared[socket["name"]][0] != socket["type"]:
                problems.append(f"{where}: input '{socket['name']}' is {declared[socket['name']][0]}, not {socket['type']}")
        slots = widget_slots(spec)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values, expected {len(slots)}")
            continue
        for (name, extra), value in zip(slots, values):
            kind, options = declared[name]
            if extra:
                continue
            if kind == "COMBO":
                choices = _combo_options(spec, name)
                is_model_list = node["type"] in dynamic or (node["type"].startswith("ConsisID") and name in (
                    "face_encoder", "model", "vae", "identity_file", "lora_name", "face_layers"))
                if not is_model_list and value not in choices:
                    problems.append(f"{where}: {name}={value!r} is not one of {choices}")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not a boolean")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
                    problems.append(f"{where}: {name}={value!r} is not a {kind}")
                elif not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"{where}: {name}={value} is outside {options.get('min')}..{options.get('max')}")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name}={value!r} is not text")
    return problems


def to_api(workflow: dict, specs: dict) -> dict:
    """UI format -> the API format `/prompt` takes."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = specs[node["type"]]
        inputs = {}
        for socket in node.get("inputs", []):
            if socket["link"] is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        for name, extra, value in widgets(spec, node.get("widgets_values", [])):
            if not extra and name not in inputs:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


if __name__ == "__main__":
    for name, workflow in build().items():
        (WORKFLOWS / name).write_text(dumps(workflow))
