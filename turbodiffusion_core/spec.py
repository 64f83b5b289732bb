"""The torch-free contract shared by the engine, the API server and the workers.

Everything here imports only the standard library and pydantic, so the API process (which never
imports torch) and the workers agree on one definition of: the model presets (ids, files, sizes,
frame counts, defaults), the generation request and how it is resolved against a preset, the job
states and stages, and how progress maps to a percentage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

FPS = 16
"""Wan models are trained at 16 frames per second; every output video uses it."""

# --------------------------------------------------------------------------------------------
# Sizes. Width x height, per resolution and aspect ratio, as TurboDiffusion's VIDEO_RES_SIZE_INFO
# (reference/turbodiffusion.md §1.7). "tiny" is ours: small enough for a CPU in seconds.
# --------------------------------------------------------------------------------------------
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640), "16:9": (832, 480), "9:16": (480, 832)},
    "720p": {"1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960), "16:9": (1280, 720), "9:16": (720, 1280)},
    "tiny": {"1:1": (128, 128), "4:3": (128, 96), "3:4": (96, 128), "16:9": (224, 128), "9:16": (128, 224)},
}
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")

SIZE_MULTIPLE = 16
"""VAE stride 8 times DiT patch 2: every side must be a multiple of 16."""

ATTENTION_TYPES = ("auto", "original", "sla", "sagesla")
QUANT_MODES = ("none", "int8", "fp8")
PRIORITIES = ("high", "normal", "low")

SLA_TOPK_DEFAULT = 0.10


class SpecError(ValueError):
    """A request the model cannot serve. `param` names the offending field (OpenAI error `param`)."""

    def __init__(self, message: str, param: Optional[str] = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def parse_size(size: str) -> tuple[int, int]:
    """'832x480' (OpenAI style) or '832*480' (Wan style) -> (width, height)."""
    text = size.strip().lower().replace("*", "x")
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise SpecError(f"size must look like WIDTHxHEIGHT, for example 832x480; got {size!r}", "size")
    return int(parts[0]), int(parts[1])


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def frames_for_seconds(seconds: float) -> int:
    """Wan frame counts are 4k+1 at 16 fps: 5 s -> 81 frames, 4 s -> 65, 1 s -> 17."""
    if seconds <= 0:
        raise SpecError("seconds must be positive", "seconds")
    k = max(1, round(seconds * FPS / 4))
    return 4 * k + 1


def seconds_for_frames(num_frames: int) -> str:
    """The OpenAI `seconds` string for a frame count: (n-1)/16, trimmed ("5", "4", "1.5")."""
    value = (num_frames - 1) / FPS
    return str(int(value)) if value == int(value) else f"{value:g}"


def latent_frames(num_frames: int) -> int:
    return 1 + (num_frames - 1) // 4


def adaptive_size(image_width: int, image_height: int, area: int) -> tuple[int, int]:
    """TurboDiffusion's adaptive resolution: keep the image's aspect ratio at the given pixel area,
    sides rounded to multiples of 16 (reference/turbodiffusion.md §1.7)."""
    ratio = image_height / image_width
    ideal_w = math.sqrt(area / ratio)
    ideal_h = math.sqrt(area * ratio)
    w = max(SIZE_MULTIPLE, round(ideal_w / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, round(ideal_h / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return w, h


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    """One file (or folder, when `folder` is set) a preset needs, and where the Hub has it."""

    role: str  # "dit", "dit_quant", "dit_high", "dit_low", "dit_high_quant", "dit_low_quant", "vae", "t5", "tokenizer"
    path: str  # path inside the preset's local folder
    repo: str  # Hugging Face repo id ("" for files the project writes itself)
    repo_path: str  # path of the file (or folder prefix) in that repo
    folder: bool = False
    optional: bool = False  # e.g. the -quant variant of a bf16 checkpoint
    shared: str = ""  # files several presets use (VAE, T5) live in models_dir/<shared>/ instead of the preset's folder


@dataclass(frozen=True)
class Preset:
    id: str
    task: Literal["t2v", "i2v"]
    arch: str  # DiT architecture name, see turbodiffusion_core.models.configs
    description: str
    sampler: Literal["rcm", "unipc"]
    files: tuple[ModelFile, ...]
    resolutions: tuple[str, ...]
    default_resolution: str
    checkpoint_format: Literal["turbo", "wan"]  # TurboDiffusion .pth or official Wan safetensors
    default_frames: int = 81
    max_frames: int = 81
    default_steps: int = 4
    max_steps: int = 4
    default_sigma_max: float = 80.0
    default_shift: float = 5.0  # unipc only
    default_guidance: float = 5.0  # unipc only
    default_boundary: float = 0.9  # i2v experts only
    default_attention: str = "auto"
    tiny: bool = False
    folder: str = ""  # local folder name under the models dir (defaults to the id)

    @property
    def local_folder(self) -> str:
        return self.folder or self.id

    def sizes(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for res in self.resolutions:
            for wh in RESOLUTIONS[res].values():
                if wh not in out:
                    out.append(wh)
        return out

    def size_for(self, resolution: str, aspect_ratio: str) -> tuple[int, int]:
        return RESOLUTIONS[resolution][aspect_ratio]

    def local_path(self, models_dir, f: ModelFile):
        """Where file `f` of this preset lives under models_dir (a pathlib.Path)."""
        from pathlib import Path

        return Path(models_dir) / (f.shared or self.local_folder) / f.path

    def file(self, role: str) -> Optional[ModelFile]:
        for f in self.files:
            if f.role == role:
                return f
        return None

    @property
    def supports_int8_file(self) -> bool:
        return any(f.role.endswith("_quant") for f in self.files)

    def describe(self) -> dict:
        """A JSON-able summary (what GET /v1/models and `turbodiffusion models` show)."""
        return {
            "id": self.id,
            "task": self.task,
            "description": self.description,
            "sampler": self.sampler,
            "resolutions": list(self.resolutions),
            "default_resolution": self.default_resolution,
            "aspect_ratios": list(ASPECT_RATIOS),
            "sizes": [format_size(w, h) for w, h in self.sizes()],
            "default_frames": self.default_frames,
            "max_frames": self.max_frames,
            "default_steps": self.default_steps,
            "max_steps": self.max_steps,
            "default_sigma_max": self.default_sigma_max if self.sampler == "rcm" else None,
            "default_boundary": self.default_boundary if self.task == "i2v" else None,
            "attention_types": list(ATTENTION_TYPES),
            "quant_modes": list(QUANT_MODES),
            "fps": FPS,
        }


_WAN_T2V_13B = "Wan-AI/Wan2.1-T2V-1.3B"
_SHARED = "wan2.1-common"  # one copy of the VAE, umT5 encoder and tokenizer for every Wan2.1-family preset


def _shared_files(tokenizer_repo: str = _WAN_T2V_13B) -> tuple[ModelFile, ...]:
    """VAE, umT5 encoder and tokenizer: the same files for every Wan2.1-family preset."""
    return (
        ModelFile("vae", "Wan2.1_VAE.pth", _WAN_T2V_13B, "Wan2.1_VAE.pth", shared=_SHARED),
        ModelFile("t5", "models_t5_umt5-xxl-enc-bf16.pth", _WAN_T2V_13B, "models_t5_umt5-xxl-enc-bf16.pth",
                  shared=_SHARED),
        ModelFile("tokenizer", "google/umt5-xxl", tokenizer_repo, "google/umt5-xxl", folder=True, shared=_SHARED),
    )


def _turbo_t2v(pid: str, arch: str, repo: str, stem: str, res: str, desc: str) -> Preset:
    return Preset(
        id=pid,
        task="t2v",
        arch=arch,
        description=desc,
        sampler="rcm",
        files=(
            ModelFile("dit", f"{stem}.pth", repo, f"{stem}.pth"),
            ModelFile("dit_quant", f"{stem}-quant.pth", repo, f"{stem}-quant.pth", optional=True),
        )
        + _shared_files(),
        resolutions=("480p", "720p"),
        default_resolution=res,
        checkpoint_format="turbo",
        default_sigma_max=80.0,
    )


PRESETS: dict[str, Preset] = {}


def _register(p: Preset) -> None:
    PRESETS[p.id] = p


_register(
    _turbo_t2v(
        "turbowan2.1-t2v-1.3b-480p", "wan2.1-t2v-1.3b", "TurboDiffusion/TurboWan2.1-T2V-1.3B-480P",
        "TurboWan2.1-T2V-1.3B-480P", "480p", "TurboDiffusion Wan2.1 T2V 1.3B, rCM 1-4 steps + SLA, best at 480p",
    )
)
_register(
    _turbo_t2v(
        "turbowan2.1-t2v-14b-480p", "wan2.1-t2v-14b", "TurboDiffusion/TurboWan2.1-T2V-14B-480P",
        "TurboWan2.1-T2V-14B-480P", "480p", "TurboDiffusion Wan2.1 T2V 14B, rCM 1-4 steps + SLA, best at 480p",
    )
)
_register(
    _turbo_t2v(
        "turbowan2.1-t2v-14b-720p", "wan2.1-t2v-14b", "TurboDiffusion/TurboWan2.1-T2V-14B-720P",
        "TurboWan2.1-T2V-14B-720P", "720p", "TurboDiffusion Wan2.1 T2V 14B, rCM 1-4 steps + SLA, best at 720p",
    )
)
_A14B = "TurboDiffusion/TurboWan2.2-I2V-A14B-720P"
_register(
    Preset(
        id="turbowan2.2-i2v-a14b-720p",
        task="i2v",
        arch="wan2.2-i2v-a14b",
        description="TurboDiffusion Wan2.2 I2V A14B (high/low-noise experts), rCM 1-4 steps + SLA, 720p",
        sampler="rcm",
        files=(
            ModelFile("dit_high", "TurboWan2.2-I2V-A14B-high-720P.pth", _A14B, "TurboWan2.2-I2V-A14B-high-720P.pth"),
            ModelFile("dit_low", "TurboWan2.2-I2V-A14B-low-720P.pth", _A14B, "TurboWan2.2-I2V-A14B-low-720P.pth"),
            ModelFile("dit_high_quant", "TurboWan2.2-I2V-A14B-high-720P-quant.pth", _A14B,
                      "TurboWan2.2-I2V-A14B-high-720P-quant.pth", optional=True),
            ModelFile("dit_low_quant", "TurboWan2.2-I2V-A14B-low-720P-quant.pth", _A14B,
                      "TurboWan2.2-I2V-A14B-low-720P-quant.pth", optional=True),
        )
        + _shared_files(),
        resolutions=("720p", "480p"),
        default_resolution="720p",
        checkpoint_format="turbo",
        default_sigma_max=200.0,
        default_boundary=0.9,
    )
)
_register(
    Preset(
        id="wan2.1-t2v-1.3b",
        task="t2v",
        arch="wan2.1-t2v-1.3b",
        description="Original Wan2.1 T2V 1.3B: 50-step flow-matching UniPC with classifier-free guidance",
        sampler="unipc",
        files=(
            ModelFile("dit", "diffusion_pytorch_model.safetensors", _WAN_T2V_13B, "diffusion_pytorch_model.safetensors"),
            ModelFile("dit_config", "config.json", _WAN_T2V_13B, "config.json"),
        )
        + _shared_files(),
        resolutions=("480p",),
        default_resolution="480p",
        checkpoint_format="wan",
        default_steps=50,
        max_steps=100,
        default_shift=5.0,
        default_guidance=5.0,
    )
)
_TINY_FILES = (
    ModelFile("dit", "tiny_dit.pth", "", ""),
    ModelFile("dit_quant", "tiny_dit-quant.pth", "", "", optional=True),
    ModelFile("vae", "Wan2.1_VAE.pth", "", ""),
    ModelFile("t5", "models_t5_umt5-xxl-enc-bf16.pth", "", ""),
    ModelFile("tokenizer", "tokenizer", "", "", folder=True),
)
_register(
    Preset(
        id="tiny-t2v",
        task="t2v",
        arch="tiny-t2v",
        description="Tiny random-weight T2V model (same code paths; runs on a CPU in seconds; output is noise-like)",
        sampler="rcm",
        files=_TINY_FILES,
        resolutions=("tiny",),
        default_resolution="tiny",
        checkpoint_format="turbo",
        default_frames=17,
        tiny=True,
    )
)
_register(
    Preset(
        id="tiny-i2v",
        task="i2v",
        arch="tiny-i2v",
        description="Tiny random-weight I2V model with two experts (same code paths as Wan2.2 I2V A14B)",
        sampler="rcm",
        files=(
            ModelFile("dit_high", "tiny_dit_high.pth", "", ""),
            ModelFile("dit_low", "tiny_dit_low.pth", "", ""),
        )
        + _TINY_FILES[2:],
        resolutions=("tiny",),
        default_resolution="tiny",
        checkpoint_format="turbo",
        default_frames=17,
        default_sigma_max=200.0,
        tiny=True,
    )
)


def default_models_dir():
    """$TD_MODELS_DIR, else ./models (a pathlib.Path)."""
    import os
    from pathlib import Path

    return Path(os.environ.get("TD_MODELS_DIR", "models")).expanduser()


def preset_paths(preset: Preset, models_dir) -> dict:
    """Local path of every file role of a preset (present or not)."""
    return {f.role: preset.local_path(models_dir, f) for f in preset.files}


def missing_files(preset: Preset, models_dir, quant: Optional[str] = None) -> list[str]:
    """Required files of a preset that are not on disk. With quant='int8' a released `-quant` DiT file
    stands in for its bf16 twin; otherwise int8 and fp8 are made at load time from the bf16 file."""
    paths = preset_paths(preset, models_dir)
    out = []
    for f in preset.files:
        if f.optional or paths[f.role].exists():
            continue
        twin = paths.get(f"{f.role}_quant")
        if quant == "int8" and twin is not None and twin.exists():
            continue
        out.append(str(paths[f.role]))
    return out


def get_preset(model_id: str) -> Preset:
    try:
        return PRESETS[model_id]
    except KeyError:
        raise SpecError(
            f"unknown model {model_id!r}; available: {', '.join(PRESETS)}", "model", code="model_not_found"
        ) from None


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
class GenerationRequest(BaseModel):
    """What a user may ask for. Every field but `prompt` is optional; `resolve` fills defaults from
    the preset and checks what the model can do. The API's create body maps onto this."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=10_000)
    model: str = "turbowan2.1-t2v-1.3b-480p"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="0 draws a random seed (returned)")
    seconds: Optional[float] = Field(None, gt=0, le=60)
    size: Optional[str] = None
    num_frames: Optional[int] = Field(None, ge=1, le=1000)
    resolution: Optional[str] = None
    aspect_ratio: Optional[str] = None
    steps: Optional[int] = Field(None, ge=1, le=100)
    sigma_max: Optional[float] = Field(None, gt=0, le=10_000)
    attention_type: Optional[str] = None
    sla_topk: Optional[float] = Field(None, gt=0, le=1)
    quant: Optional[str] = None
    ode: bool = False
    boundary: Optional[float] = Field(None, ge=0.5, le=1.0)
    adaptive_resolution: bool = False
    negative_prompt: Optional[str] = Field(None, max_length=10_000)
    guidance_scale: Optional[float] = Field(None, ge=0, le=30)
    shift: Optional[float] = Field(None, gt=0, le=100)
    image_width: Optional[int] = Field(None, ge=1, description="set by the server from the input image")
    image_height: Optional[int] = Field(None, ge=1, description="set by the server from the input image")


class ResolvedRequest(BaseModel):
    """A request with every value concrete and checked against its preset: what the engine runs."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str
    seed: int
    width: int
    height: int
    num_frames: int
    steps: int
    sampler: str
    sigma_max: float
    attention_type: str
    sla_topk: float
    quant: Optional[str]
    ode: bool
    boundary: float
    negative_prompt: Optional[str]
    guidance_scale: float
    shift: float
    task: str

    @property
    def size(self) -> str:
        return format_size(self.width, self.height)

    @property
    def seconds(self) -> str:
        return seconds_for_frames(self.num_frames)


def _choice(value: Optional[str], allowed, param: str, default: str) -> str:
    if value is None or value == "":
        return default
    if value not in allowed:
        raise SpecError(f"{param} must be one of {', '.join(allowed)}; got {value!r}", param)
    return value


def resolve(req: GenerationRequest) -> ResolvedRequest:
    """Fill defaults from the preset and check the request against what the model can do.

    Raises SpecError with a message that says what *is* supported."""
    preset = get_preset(req.model)

    # --- size ---------------------------------------------------------------------------
    if req.size and (req.resolution or req.aspect_ratio):
        raise SpecError("give either size or resolution/aspect_ratio, not both", "size")
    if req.size:
        width, height = parse_size(req.size)
        allowed = preset.sizes()
        if (width, height) not in allowed:
            raise SpecError(
                f"size {req.size} is not supported by {preset.id}; supported sizes: "
                + ", ".join(format_size(w, h) for w, h in allowed),
                "size",
                code="unsupported_value",
            )
    else:
        resolution = _choice(req.resolution, preset.resolutions, "resolution", preset.default_resolution)
        aspect = _choice(req.aspect_ratio, ASPECT_RATIOS, "aspect_ratio", "16:9")
        width, height = preset.size_for(resolution, aspect)
        if req.adaptive_resolution:
            if preset.task != "i2v":
                raise SpecError("adaptive_resolution needs an image-to-video model", "adaptive_resolution")
            if req.image_width and req.image_height:
                width, height = adaptive_size(req.image_width, req.image_height, width * height)

    # --- frames -------------------------------------------------------------------------
    if req.num_frames is not None and req.seconds is not None:
        raise SpecError("give either seconds or num_frames, not both", "num_frames")
    if req.num_frames is not None:
        num_frames = req.num_frames
        param = "num_frames"
    elif req.seconds is not None:
        num_frames = frames_for_seconds(req.seconds)
        param = "seconds"
    else:
        num_frames = preset.default_frames
        param = "num_frames"
    if (num_frames - 1) % 4 != 0:
        raise SpecError(f"num_frames must be 4k+1 (for example 17, 33, 49, 65, 81); got {num_frames}", param)
    if num_frames > preset.max_frames:
        max_s = seconds_for_frames(preset.max_frames)
        raise SpecError(
            f"{preset.id} makes at most {preset.max_frames} frames ({max_s} s at {FPS} fps); asked for {num_frames}",
            param,
            code="unsupported_value",
        )

    # --- sampler ------------------------------------------------------------------------
    steps = req.steps if req.steps is not None else preset.default_steps
    if not 1 <= steps <= preset.max_steps:
        raise SpecError(f"steps must be between 1 and {preset.max_steps} for {preset.id}; got {steps}", "steps")
    if preset.sampler == "rcm" and req.negative_prompt:
        raise SpecError(
            f"{preset.id} is a few-step rCM model without classifier-free guidance; negative_prompt is only for "
            "the original Wan models (for example wan2.1-t2v-1.3b)",
            "negative_prompt",
        )
    if preset.task != "i2v":
        if req.boundary is not None:
            raise SpecError("boundary is only for the two-expert image-to-video models", "boundary")
    attention = _choice(req.attention_type, ATTENTION_TYPES, "attention_type", preset.default_attention)
    quant = _choice(req.quant, QUANT_MODES, "quant", "") or None

    return ResolvedRequest(
        prompt=req.prompt,
        model=preset.id,
        seed=req.seed,
        width=width,
        height=height,
        num_frames=num_frames,
        steps=steps,
        sampler=preset.sampler,
        sigma_max=req.sigma_max if req.sigma_max is not None else preset.default_sigma_max,
        attention_type=attention,
        sla_topk=req.sla_topk if req.sla_topk is not None else SLA_TOPK_DEFAULT,
        quant=quant,
        ode=req.ode,
        boundary=req.boundary if req.boundary is not None else preset.default_boundary,
        negative_prompt=req.negative_prompt,
        guidance_scale=req.guidance_scale if req.guidance_scale is not None else preset.default_guidance,
        shift=req.shift if req.shift is not None else preset.default_shift,
        task=preset.task,
    )


# --------------------------------------------------------------------------------------------
# Jobs: states, stages, progress
# --------------------------------------------------------------------------------------------
JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = ("completed", "failed", "cancelled")

# Stages in the order a job passes them, with the share of the progress bar each one owns.
STAGES: tuple[tuple[str, float], ...] = (
    ("queued", 0.0),
    ("loading", 0.0),
    ("text_encode", 0.05),
    ("denoise", 0.75),
    ("vae_decode", 0.12),
    ("encode_video", 0.05),
    ("store", 0.03),
)


def overall_progress(stage: str, fraction: float = 0.0) -> int:
    """Integer percent for a job that is `fraction` (0..1) through `stage`."""
    done = 0.0
    for name, share in STAGES:
        if name == stage:
            return min(100, int(100 * (done + share * max(0.0, min(1.0, fraction)))))
        done += share
    return 100


@dataclass
class ProgressEvent:
    """What the engine reports through `on_progress` while it works."""

    stage: str
    fraction: float = 0.0  # 0..1 within the stage
    step: Optional[int] = None  # 1-based denoising step, during "denoise"
    total_steps: Optional[int] = None
    info: dict = field(default_factory=dict)

    @property
    def percent(self) -> int:
        return overall_progress(self.stage, self.fraction)
