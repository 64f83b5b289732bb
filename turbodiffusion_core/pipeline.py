"""Build once, generate many: the engine's single entry point.

    pipe = load_pipeline("turbowan2.1-t2v-1.3b-480p", models_dir=Path("models"))
    result = pipe.generate(spec.resolve(spec.GenerationRequest(prompt="...")), on_progress=print)

A pipeline owns the resident modules of one preset (text encoder, DiT or the two I2V experts, VAE)
on one device. `generate` reports progress per stage through `on_progress(spec.ProgressEvent)`,
checks `should_cancel()` between denoising steps (raising errors.Cancelled) and returns the frames
with the seed actually used and the time each stage took. It knows nothing of HTTP, Redis or RQ.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import spec
from .errors import EngineError, ModelFilesMissing

log = logging.getLogger("turbodiffusion.pipeline")

ProgressFn = Callable[[spec.ProgressEvent], None]
CancelFn = Callable[[], bool]


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seed: int
    timings: dict[str, float]
    width: int
    height: int
    num_frames: int
    info: dict = field(default_factory=dict)


def default_models_dir() -> Path:
    import os

    return Path(os.environ.get("TD_MODELS_DIR", "models")).expanduser()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def preset_paths(preset: spec.Preset, models_dir: Path) -> dict[str, Path]:
    """Local path of every file role of a preset (present or not)."""
    return {f.role: preset.local_path(models_dir, f) for f in preset.files}


def missing_files(preset: spec.Preset, models_dir: Path, quant: Optional[str] = None) -> list[str]:
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


class _Timer:
    """Wall-clock stage timings, synchronising CUDA so a stage's time is its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class VideoPipeline:
    """Resident modules of one preset on one device, and the generation loop around them."""

    def __init__(
        self,
        preset: spec.Preset,
        *,
        text_encoder,
        vae,
        experts: dict,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "auto",
        quant: Optional[str] = None,
    ):
        self.preset = preset
        self.text_encoder = text_encoder
        self.vae = vae
        self.experts = experts  # {"dit": model} for T2V, {"high": model, "low": model} for I2V
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.quant = quant
        self.load_seconds = 0.0

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls,
        model_id: str,
        *,
        models_dir: Optional[Path] = None,
        device: str = "auto",
        attention: str = "auto",
        quant: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "VideoPipeline":
        from .checkpoints import load_dit
        from .models.text_encoder import TextEncoder
        from .models.vae import load_vae

        preset = spec.get_preset(model_id)
        models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
        dev = pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if dev.type == "cpu":
            # Random or decaying activations reach subnormal floats, which x86 CPUs process ~100x slower.
            torch.set_flush_denormal(True)
        if quant == "none":
            quant = None
        start = time.perf_counter()
        if preset.tiny:
            from .tiny import ensure_tiny_files

            ensure_tiny_files(preset, models_dir)
        missing = missing_files(preset, models_dir, quant)
        if missing:
            raise ModelFilesMissing(
                f"{preset.id}: missing model files: {', '.join(missing)}. "
                f"Run `turbodiffusion download {preset.id} --models-dir {models_dir}` first."
            )
        paths = preset_paths(preset, models_dir)
        tiny = preset.tiny
        log.info("loading %s on %s (%s, attention=%s, quant=%s)", preset.id, dev, dtype, attention, quant or "none")

        text_encoder = TextEncoder.from_files(
            paths["t5"], paths["tokenizer"], config="tiny" if tiny else "umt5-xxl", device=dev,
            dtype=torch.float32 if dev.type == "cpu" else torch.bfloat16,
        )
        vae = load_vae(paths["vae"], config="tiny" if tiny else "wan2.1", device=dev, dtype=dtype)

        def dit_file(role: str) -> Path:
            qrole = f"{role}_quant"
            if quant == "int8" and qrole in paths and paths[qrole].exists():
                return paths[qrole]
            return paths[role]

        if preset.task == "i2v":
            experts = {
                name: load_dit(preset.arch, dit_file(f"dit_{name}"), device=dev, dtype=dtype, quant=quant)
                for name in ("high", "low")
            }
        else:
            experts = {"dit": load_dit(preset.arch, dit_file("dit"), device=dev, dtype=dtype, quant=quant)}
        pipe = cls(preset, text_encoder=text_encoder, vae=vae, experts=experts, device=dev, dtype=dtype,
                   attention=attention, quant=quant)
        pipe.load_seconds = time.perf_counter() - start
        log.info("%s ready in %.1f s", preset.id, pipe.load_seconds)
        return pipe

    def info(self) -> dict:
        out = {
            "model": self.preset.id,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention,
            "quant": self.quant or "none",
            "load_seconds": round(self.load_seconds, 3),
        }
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
            out["memory_allocated_gb"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 3)
        return out

    # ----------------------------------------------------------------------------------------
    def _encode_prompt(self, text: str) -> torch.Tensor:
        emb = self.text_encoder.encode([text])[0]
        return emb.to(self.device, self.dtype).unsqueeze(0)

    def _condition_on_image(self, image, width: int, height: int, num_frames: int) -> torch.Tensor:
        """Wan I2V conditioning y = [mask (4 ch, 1 on latent frame 0), VAE latent of image + zero frames]."""
        from PIL import Image

        img = image.convert("RGB").resize((width, height), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).to(self.device)
        first = arr.permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W] in [-1, 1]
        video = torch.zeros(1, 3, num_frames, height, width, device=self.device, dtype=torch.float32)
        video[0, :, 0] = first
        latent = self.vae.encode(video.to(self.vae_dtype))  # [1, 16, T', h, w]
        t_lat = latent.shape[2]
        mask = torch.zeros(1, 4, t_lat, height // 8, width // 8, device=self.device, dtype=latent.dtype)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latent], dim=1).to(self.dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def expert_for(self, t_cur: float, boundary: float) -> str:
        """Which DiT runs at RF time t_cur: I2V switches to the low-noise expert once t < boundary."""
        if "dit" in self.experts:
            return "dit"
        return "high" if t_cur >= boundary else "low"

    def generate(
        self,
        req: spec.ResolvedRequest,
        image=None,
        on_progress: Optional[ProgressFn] = None,
        should_cancel: Optional[CancelFn] = None,
    ) -> GenerationResult:
        if req.model != self.preset.id:
            raise EngineError(f"this pipeline serves {self.preset.id}, not {req.model}")
        if self.preset.task == "i2v" and image is None:
            raise EngineError(f"{self.preset.id} is an image-to-video model: give an input image")
        report = on_progress or (lambda ev: None)
        seed = req.seed or (secrets.randbits(63) or 1)
        timer = _Timer(self.device)
        expert_trace: list[str] = []

        with torch.inference_mode():
            report(spec.ProgressEvent("text_encode", 0.0))
            with timer.stage("text_encode"):
                context = self._encode_prompt(req.prompt)
                negative = None
                if self.preset.sampler == "unipc" and req.guidance_scale != 1.0:
                    negative = self._encode_prompt(req.negative_prompt or DEFAULT_NEGATIVE_PROMPT)
            report(spec.ProgressEvent("text_encode", 1.0))

            y = None
            if self.preset.task == "i2v":
                with timer.stage("image_encode"):
                    y = self._condition_on_image(image, req.width, req.height, req.num_frames)

            shape = (1, 16, spec.latent_frames(req.num_frames), req.height // 8, req.width // 8)
            generator = torch.Generator(device=self.device).manual_seed(seed)

            def step_done(i: int, n: int, t: float) -> None:
                report(spec.ProgressEvent("denoise", i / n, step=i, total_steps=n, info={"t": t}))

            report(spec.ProgressEvent("denoise", 0.0, step=0, total_steps=req.steps))
            with timer.stage("denoise"):
                if self.preset.sampler == "rcm":
                    latent = self._sample_rcm(req, shape, generator, context, y, step_done, should_cancel,
                                              expert_trace)
                else:
                    latent = self._sample_unipc(req, shape, generator, context, negative, step_done,
                                                should_cancel)

            report(spec.ProgressEvent("vae_decode", 0.0))
            with timer.stage("vae_decode"):
                video = self.vae.decode(
                    latent.to(self.vae_dtype),
                    on_frame=lambda done, total: report(spec.ProgressEvent("vae_decode", done / total)),
                )
                from .video import frames_to_uint8

                frames = frames_to_uint8(video)

        info = {"experts": expert_trace} if expert_trace else {}
        return GenerationResult(frames=frames, seed=seed, timings=timer.timings, width=req.width,
                                height=req.height, num_frames=req.num_frames, info=info)

    def _dit_kwargs(self, req: spec.ResolvedRequest) -> dict:
        return {"attention": req.attention_type if req.attention_type != "auto" else self.attention,
                "sla_topk": req.sla_topk}

    def _sample_rcm(self, req, shape, generator, context, y, step_done, should_cancel, expert_trace):
        from .sampling.rcm import rcm_sample

        kwargs = self._dit_kwargs(req)

        def denoise(x, t_input, step_index, t_cur):
            name = self.expert_for(t_cur, req.boundary)
            expert_trace.append(name)
            return self.experts[name](x.to(self.dtype), t_input.to(self.dtype), context, y=y, **kwargs)

        return rcm_sample(
            denoise, shape, steps=req.steps, sigma_max=req.sigma_max, generator=generator, device=self.device,
            ode=req.ode, model_dtype=self.dtype, on_step=step_done, should_cancel=should_cancel,
        )

    def _sample_unipc(self, req, shape, generator, context, negative, step_done, should_cancel):
        from .sampling.unipc import unipc_sample

        kwargs = self._dit_kwargs(req)
        model = self.experts["dit"]
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)

        def velocity_of(ctx):
            def fn(x, t_input, step_index, sigma):
                return model(x.to(self.dtype), t_input.to(self.dtype), ctx, **kwargs).float()

            return fn

        return unipc_sample(
            velocity_of(context), noise, steps=req.steps, shift=req.shift, guidance_scale=req.guidance_scale,
            uncond_fn=velocity_of(negative) if negative is not None else None, on_step=step_done,
            should_cancel=should_cancel,
        )


# Default unconditional prompt for classifier-free guidance on the original 50-step models, used when a
# request gives none. Wan ships a list of undesired traits for this purpose (reference/wan.md §5); this is
# our own wording of the same traits.
DEFAULT_NEGATIVE_PROMPT = (
    "oversaturated colours, overexposed, static image, frozen frames, blurry details, subtitles, text, "
    "painting, artwork, greyish tint, worst quality, low quality, jpeg artifacts, ugly, deformed, "
    "extra fingers, badly drawn hands, badly drawn face, malformed limbs, fused fingers, "
    "cluttered background, crowded background, walking backwards"
)


def load_pipeline(
    model_id: str,
    models_dir: Optional[Path] = None,
    device: str = "auto",
    attention: str = "auto",
    quant: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> VideoPipeline:
    """Build the resident pipeline of one preset (see module docstring)."""
    return VideoPipeline.from_preset(model_id, models_dir=models_dir, device=device, attention=attention,
                                     quant=quant, dtype=dtype)
