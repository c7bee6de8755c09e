"""The two contenders, our path (`Ours`) and `diffusers.ConsisIDPipeline` (`Diffusers`), the
modes each runs in, and the inputs both get.

Each contender loads, encodes (with prompts), samples and decodes as its users call it; `Steps`
takes the step-end timestamps from either one's callback. bench/README.md says what each mode runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consisid_core.checkpoint import Checkpoint
from consisid_core.performance import Performance, StepCacheStats
from consisid_core.sampling import decode, sample
from consisid_core.text import MAX_SEQUENCE_LENGTH, TextEmbeddings, encode_with_checkpoint
from consisid_core.tiling import Tiling
from consisid_core.tiny import random_identity

from .measuring import PeakMemory

SEED = 42
GUIDANCE = 6.0
PROMPT = (
    "The video features a woman standing next to an airplane, engaged in a conversation on her cell phone. "
    "She is wearing sunglasses and a black top, and she appears to be talking seriously."
)
NEGATIVE_PROMPT = "blurry, low quality, distorted face"

@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    kind: str  # "default", "decode" (re-decode the default latents), "sample" (a whole run)
    ours: dict = field(default_factory=dict)  # Performance fields for the run
    ours_load: dict = field(default_factory=dict)  # Checkpoint.load_model options
    diffusers: str | None = None  # how diffusers does the same, None when it has no counterpart
    gpu_only: bool = False


DEFAULT = Mode("default", "default", "default")
MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("tiling", "VAE tiling", "decode", diffusers="vae.enable_tiling"),
        Mode("slicing", "VAE slicing", "decode", diffusers="vae.enable_slicing"),
        Mode("offload-model", "model CPU offload", "sample", {"offload": "model"},
             diffusers="enable_model_cpu_offload", gpu_only=True),
        Mode("offload-sequential", "sequential CPU offload", "sample", {"offload": "sequential"},
             diffusers="enable_sequential_cpu_offload", gpu_only=True),
        Mode("fp8", "fp8 weights", "sample", {}, {"fp8": True},
             diffusers="transformer.enable_layerwise_casting(float8_e4m3fn)"),
        Mode("compile", "torch.compile", "sample", {"compile": True}, diffusers="torch.compile(transformer)",
             gpu_only=True),
        Mode("sage", "SageAttention", "sample", {"attention": "sage"}, diffusers=None, gpu_only=True),
        *(
            Mode(f"cache-{t}", f"step cache {t}", "sample", {"step_cache": t})
            for t in (0.1, 0.15, 0.2)
        ),
    )
}
"""Every mode the bench knows. On the CPU, `gpu_only` modes run only when asked for by name."""


def default_modes(device: torch.device) -> list[str]:
    return [m.name for m in MODES.values() if device.type == "cuda" or not m.gpu_only]

@dataclass
class RunResult:
    encode_s: float = float("nan")  # with prompts: ours' encode_with_checkpoint, diffusers' encode_prompt
    encode_mb: float = float("nan")
    run_mb: float = float("nan")  # the whole run's peak above its start (RSS, or GPU allocated)
    run_anon_mb: float = float("nan")  # the same for RssAnon (CPU only)
    load_s: float = float("nan")
    load_mb: float = float("nan")
    held_mb: float = float("nan")  # still held when the load returned: the resident weights
    setup_s: float = float("nan")  # call start to the end of step 1
    step_s: float = float("nan")
    sample_s: float = float("nan")
    sample_mb: float = float("nan")
    decode_s: float = float("nan")
    decode_mb: float = float("nan")
    latents: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    error: str = ""
    cache_counts: tuple[int, int] | None = None  # step cache: transformer forwards (computed, skipped)

    @property
    def total_s(self) -> float:
        """Sampling + decode, and the text encode when there was one."""
        return self.sample_s + self.decode_s + (self.encode_s if self.encode_s == self.encode_s else 0.0)


class Steps:
    """Step-end timestamps (synchronised on a GPU); optionally a phase switch at the last step."""

    def __init__(self, device: torch.device, steps: int, memory: PeakMemory, result: RunResult):
        self.device, self.steps, self.memory, self.result = device, steps, memory, result
        self.times: list[float] = []
        self.start = 0.0

    def begin(self) -> None:
        self.memory.reset()
        self.start = time.perf_counter()

    def __call__(self, done: int, latents: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now)
        if done == self.steps:
            r = self.result
            r.sample_s = now - self.start
            r.sample_mb = self.memory.peak_mb()
            r.setup_s = self.times[0] - self.start
            r.step_s = (now - self.times[0]) / (len(self.times) - 1) if len(self.times) > 1 else r.setup_s
            r.latents = latents.detach().to("cpu", copy=True)
            self.memory.reset()
            self.decode_start = time.perf_counter()

@dataclass
class Inputs:
    identity: object
    text: TextEmbeddings | None  # precomputed embeddings, or None: each path encodes `prompt`
    frames: int
    height: int
    width: int
    steps: int
    prompt: str | None = None
    negative_prompt: str = ""


def make_inputs(checkpoint: Path, steps: int, frames: int, height: int, width: int,
                text: str = "embeddings") -> Inputs:
    """`text` "embeddings": the same random text embeddings for both paths; "t5": the prompt
    strings PROMPT and NEGATIVE_PROMPT, which each path encodes with the checkpoint's T5."""
    config = Checkpoint.open(checkpoint).transformer_config
    identity = random_identity(config, seed=11, face_size=64)
    if text == "t5":
        return Inputs(identity, None, frames, height, width, steps, PROMPT, NEGATIVE_PROMPT)
    g = torch.Generator("cpu").manual_seed(3)
    shape = (1, MAX_SEQUENCE_LENGTH, config["text_embed_dim"])
    # T5-XXL's outputs are small (its final RMSNorm): this scale keeps the random ones alike
    embeddings = TextEmbeddings(0.1 * torch.randn(shape, generator=g), 0.1 * torch.randn(shape, generator=g))
    return Inputs(identity, embeddings, frames, height, width, steps)


class Ours:
    name = "ours"
    encodes_before_load = True  # as the CLI: encode_with_checkpoint, then load_model

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.model = self.vae = None
        self.text: TextEmbeddings | None = None

    def encode(self, inputs: Inputs) -> None:
        """The checkpoint's T5, loaded for the prompts and released (`encode_with_checkpoint`)."""
        device = None if self.device.type == "cpu" else self.device
        self.text = encode_with_checkpoint(
            Checkpoint.open(self.checkpoint), self.dtype, inputs.prompt, inputs.negative_prompt, device
        )

    def load(self, mode: Mode) -> None:
        self.model = Checkpoint.open(self.checkpoint).load_model(self.dtype, **mode.ours_load)

    def run(self, mode: Mode, inputs: Inputs, steps: Steps, decode_too: bool = True) -> None:
        options = {}
        if mode.ours:
            options["performance"] = Performance(**mode.ours)
        stats = StepCacheStats()
        device = None if self.device.type == "cpu" else self.device
        steps.begin()
        latents = sample(
            self.model,
            inputs.identity,
            self.text if self.text is not None else inputs.text,
            seed=SEED,
            steps=inputs.steps,
            cfg=GUIDANCE,
            length=inputs.frames,
            height=inputs.height,
            width=inputs.width,
            callback=lambda done, _total, latents: steps(done, latents),
            device=device,
            step_cache_stats=stats,
            **options,
        )
        if options.get("performance") is not None and options["performance"].step_cache > 0:
            steps.result.cache_counts = (stats.computed, stats.skipped)
        if decode_too:
            # as the CLI: the transformer is released before the decode (the VAE is all it needs)
            self.vae, self.model = self.model.vae, None
            steps.result.frames = decode(self.vae, latents, device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            steps.result.decode_s = time.perf_counter() - steps.decode_start
            steps.result.decode_mb = steps.memory.peak_mb()

    def decode_only(self, mode: Mode, latents: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        device = None if self.device.type == "cpu" else self.device
        vae = self.vae if self.model is None else self.model.vae
        if mode.name == "tiling":
            return decode(vae, latents, device, tiling=Tiling.halves(inputs.height, inputs.width))
        return decode(vae, latents, device, slicing=True)

    def release(self) -> None:
        self.model = self.vae = self.text = None


class Diffusers:
    name = "diffusers"
    encodes_before_load = False  # pipe(prompt=...) encodes inside the call, its T5 loaded with the rest

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device):
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        self.pipe = None

    def load(self, mode: Mode) -> None:
        from diffusers import ConsisIDPipeline

        pipe = ConsisIDPipeline.from_pretrained(self.checkpoint, torch_dtype=self.dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if mode.name == "offload-model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif mode.name == "offload-sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if mode.name == "fp8":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=self.dtype)
        if mode.name == "compile":
            pipe.transformer = torch.compile(pipe.transformer)
        self.pipe = pipe

    def run(self, mode: Mode, inputs: Inputs, steps: Steps, decode_too: bool = True) -> None:
        pipe = self.pipe
        target = pipe.transformer.dtype
        execution = self.device  # where the pipeline puts its inputs
        if inputs.prompt is not None:
            text = dict(prompt=inputs.prompt, negative_prompt=inputs.negative_prompt)
            pipe.encode_prompt = _timed_encode(pipe.encode_prompt, steps)
        else:
            text = dict(prompt_embeds=inputs.text.positive.to(execution, target),
                        negative_prompt_embeds=inputs.text.negative.to(execution, target))
        steps.begin()
        try:
            video = self._call(pipe, inputs, steps, text, decode_too)
        finally:
            vars(pipe).pop("encode_prompt", None)
        if decode_too:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            steps.result.decode_s = time.perf_counter() - steps.decode_start
            steps.result.decode_mb = steps.memory.peak_mb()
            steps.result.frames = video[0].permute(0, 2, 3, 1).float().cpu()

    @staticmethod
    def _call(pipe, inputs: Inputs, steps: Steps, text: dict, decode_too: bool):
        return pipe(
            image=inputs.identity.face_image_pil(),
            **text,
            height=inputs.height,
            width=inputs.width,
            num_frames=inputs.frames,
            num_inference_steps=inputs.steps,
            guidance_scale=GUIDANCE,
            use_dynamic_cfg=False,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pt" if decode_too else "latent",
            return_dict=False,
            callback_on_step_end=lambda _p, i, _t, tensors: steps(i + 1, tensors["latents"]) or {},
            id_cond=inputs.identity.id_cond,
            id_vit_hidden=list(inputs.identity.id_vit_hidden),
            kps_cond=inputs.identity.kps.numpy(),
        )[0]

    def decode_only(self, mode: Mode, latents: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        if mode.name == "tiling":
            tiling = Tiling.halves(inputs.height, inputs.width)
            factor_height, factor_width = tiling.factors(pipe.vae_scale_factor_spatial)
            vae.enable_tiling(
                tile_sample_min_height=tiling.tile_height,
                tile_sample_min_width=tiling.tile_width,
                tile_overlap_factor_height=factor_height,
                tile_overlap_factor_width=factor_width,
            )
        else:
            vae.enable_slicing()
        try:
            with torch.no_grad():
                video = pipe.decode_latents(latents.to(self.device, vae.dtype))
                video = pipe.video_processor.postprocess_video(video=video, output_type="pt")
        finally:
            vae.disable_tiling()
            vae.disable_slicing()
        return video[0].permute(0, 2, 3, 1).float().cpu()

    def release(self) -> None:
        self.pipe = None


def _timed_encode(encode_prompt, steps: Steps):
    """`encode_prompt` that closes the text-encode phase (from the call of `pipe(...)`) when it
    returns and starts the sampling phase there, so both paths' phases cover the same work."""

    def timed(*args, **kwargs):
        out = encode_prompt(*args, **kwargs)
        if steps.device.type == "cuda":
            torch.cuda.synchronize(steps.device)
        steps.result.encode_s = time.perf_counter() - steps.start
        steps.result.encode_mb = steps.memory.peak_mb()
        steps.begin()
        return out

    return timed
