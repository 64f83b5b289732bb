"""The pipelines a worker keeps resident: built once at start, used by every job after.

Loading a model is the expensive part (seconds for the tiny presets, minutes for 14B weights),
so a worker loads its models before it takes its first job and never unloads them. A lock per
pipeline makes sure two threads sharing a Residency (an in-process worker restarted in tests,
say) never run the same modules at once: the engine's modules keep per-call state such as the
VAE's feature cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from turbodiffusion_core.errors import EngineError

log = logging.getLogger("turbodiffusion.worker")


class NotResident(EngineError):
    code = "model_not_loaded"


_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


@dataclass(frozen=True)
class EngineOptions:
    """How a worker places and prepares its pipelines, from TD_* environment variables:

    - TD_EXPERT_RESIDENCY: auto | resident | swap. I2V experts both on the GPU, or the idle one in
      pinned host memory with a streamed switch; auto decides from free GPU memory.
    - TD_TEXT_ENCODER: auto | gpu | gpu-fp8 | cpu. umT5 on the GPU (bf16), on the GPU with fp8 weights
      (7.2 instead of 10.6 GiB), or in host memory (frees ~11 GB; a new prompt then takes seconds, a
      repeated one nothing: prompt cache).
    - TD_WARMUP: auto | 1 | 0. One short generation at start so the first request is not slow (auto: on
      a GPU only; a CPU has nothing to compile or autotune).
    - TD_COMPILE: 0 | 1 | <torch.compile backend>. torch.compile the DiT forward (off by default).
    - TD_RESERVE_GB: working memory the auto choices keep free (default by model size and resolution:
      4 / 8 GB for the 1.3B model at 480p / 720p, 8 / 16 GB for the 14B ones).
    - TD_VAE_CHUNK_FRAMES: latent frames per VAE decoder pass after the first (default 1, as the official
      code; the same video for any value, faster and more memory for larger ones).
    - TD_CUDNN_BENCHMARK: 1 | 0. cuDNN's per-shape algorithm search for the VAE's convolutions (default off;
      the warm-up pays for the search).
    - TD_MP4_ENCODER: thread | process. Where the streaming H.264 encode runs: a thread of the worker (default)
      or a helper process with an interpreter of its own (measured no faster on an H100 machine: 1.633 vs 1.623 s
      request -> MP4, bench/results/e2e_h100_mp4_process.json).
    - TD_CUDA_GRAPHS: 1 | 0. Replay the DiT forward from CUDA graphs on a GPU (default on: 0.175 -> 0.146 s a
      1.3B 480p step inside a request on an H100; captured at warm-up for the default shape, on the second call
      of any other; not with TD_COMPILE, swapping experts or several GPUs).
    """

    expert_residency: str = "auto"
    text_encoder: str = "auto"
    warmup: str = "auto"
    compile_dit: str = "0"
    reserve_gb: Optional[float] = None
    vae_chunk_frames: str = "1"
    cudnn_benchmark: str = "0"
    mp4_encoder: str = "thread"
    cuda_graphs: str = "1"

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "EngineOptions":
        env = os.environ if environ is None else environ
        reserve = env.get("TD_RESERVE_GB", "").strip()
        options = cls(
            expert_residency=env.get("TD_EXPERT_RESIDENCY", "auto").strip().lower() or "auto",
            text_encoder=env.get("TD_TEXT_ENCODER", "auto").strip().lower() or "auto",
            warmup=env.get("TD_WARMUP", "auto").strip().lower() or "auto",
            compile_dit=env.get("TD_COMPILE", "0").strip() or "0",
            reserve_gb=float(reserve) if reserve else None,
            vae_chunk_frames=env.get("TD_VAE_CHUNK_FRAMES", "1").strip() or "1",
            cudnn_benchmark=env.get("TD_CUDNN_BENCHMARK", "0").strip().lower() or "0",
            mp4_encoder=env.get("TD_MP4_ENCODER", "thread").strip().lower() or "thread",
            cuda_graphs=env.get("TD_CUDA_GRAPHS", "1").strip().lower() or "1",
        )
        options.check()
        return options

    def check(self) -> None:
        problems = []
        if self.expert_residency not in ("auto", "resident", "swap"):
            problems.append(f"TD_EXPERT_RESIDENCY must be auto, resident or swap; got {self.expert_residency!r}")
        if self.text_encoder not in ("auto", "gpu", "gpu-fp8", "cpu"):
            problems.append(f"TD_TEXT_ENCODER must be auto, gpu, gpu-fp8 or cpu; got {self.text_encoder!r}")
        if self.warmup not in ("auto", *_ON, *_OFF):
            problems.append(f"TD_WARMUP must be auto, 1 or 0; got {self.warmup!r}")
        if not self.vae_chunk_frames.isdigit() or int(self.vae_chunk_frames) < 1:
            problems.append(f"TD_VAE_CHUNK_FRAMES must be a positive integer (latent frames per decoder pass); "
                            f"got {self.vae_chunk_frames!r}")
        if self.cudnn_benchmark not in (*_ON, *_OFF):
            problems.append(f"TD_CUDNN_BENCHMARK must be 1 or 0; got {self.cudnn_benchmark!r}")
        if self.mp4_encoder not in ("process", "thread"):
            problems.append(f"TD_MP4_ENCODER must be process or thread; got {self.mp4_encoder!r}")
        if self.cuda_graphs not in (*_ON, *_OFF):
            problems.append(f"TD_CUDA_GRAPHS must be 1 or 0; got {self.cuda_graphs!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def compile_arg(self) -> Any:
        """pipeline's compile_dit: False, True (inductor) or a backend name."""
        value = self.compile_dit.lower()
        if value in _OFF:
            return False
        if value in _ON:
            return True
        return self.compile_dit

    @property
    def decode_args(self) -> dict[str, Any]:
        """The pipeline's run-time arguments: vae_chunk_frames, cudnn_benchmark, mp4_encoder and cuda_graphs."""
        return {"vae_chunk_frames": int(self.vae_chunk_frames), "cudnn_benchmark": self.cudnn_benchmark in _ON,
                "mp4_encoder": self.mp4_encoder, "cuda_graphs": self.cuda_graphs in _ON}

    def should_warm_up(self, device_type: str) -> bool:
        if self.warmup == "auto":
            return device_type == "cuda"
        return self.warmup in _ON


class Residency:
    def __init__(self, pipelines: dict[str, Any]):
        self._pipelines = dict(pipelines)
        self._locks = {model: threading.Lock() for model in pipelines}

    @classmethod
    def load(
        cls,
        models: list[str],
        *,
        models_dir: Path,
        device: str = "auto",
        attention: str = "auto",
        quant: Optional[str] = None,
        options: Optional[EngineOptions] = None,
    ) -> "Residency":
        """Load each model (options: EngineOptions, default from the environment), then warm it up
        when the options say so. A pipeline's info() (what describe() publishes to the fleet registry
        and GET /v1/models) reports its expert residency mode, text encoder placement and warm-up."""
        from turbodiffusion_core.pipeline import load_pipeline  # torch: only in the worker, only here

        options = options or EngineOptions.from_env()
        pipelines = {}
        for model in models:
            start = time.perf_counter()
            log.info("loading %s (device %s, attention %s, quant %s, %s)", model, device, attention, quant or "none",
                     options)
            pipe = load_pipeline(model, models_dir=models_dir, device=device, attention=attention, quant=quant,
                                 expert_residency=options.expert_residency, text_encoder=options.text_encoder,
                                 compile_dit=options.compile_arg, reserve_gb=options.reserve_gb,
                                 **options.decode_args)
            if options.should_warm_up(pipe.device.type):
                pipe.warmup()
            pipelines[model] = pipe
            log.info("%s resident after %.1f s: %s", model, time.perf_counter() - start, pipe.info())
        return cls(pipelines)

    @property
    def models(self) -> list[str]:
        return list(self._pipelines)

    def get(self, model: str) -> Any:
        try:
            return self._pipelines[model]
        except KeyError:
            raise NotResident(f"this worker holds {', '.join(self._pipelines)}, not {model}") from None

    def lock(self, model: str) -> threading.Lock:
        self.get(model)
        return self._locks[model]

    def describe(self) -> dict[str, dict]:
        """model -> pipeline info (device, attention, quant...), for the fleet registry."""
        return {model: pipe.info() for model, pipe in self._pipelines.items()}
