"""Build once, generate many: the engine's single entry point.

    pipe = load_pipeline("turbowan2.1-t2v-1.3b-480p", models_dir=Path("models"))
    pipe.warmup()                                   # optional: compile / autotune before the first request
    result = pipe.generate(spec.resolve(spec.GenerationRequest(prompt="...")), on_progress=print)
    result = pipe.generate(request, output_dir="out/")   # + MP4, thumbnail, spritesheet written; result.files

A pipeline owns the resident modules of one preset (text encoder, DiT or the two I2V experts, VAE)
on one device. `generate` reports progress per stage through `on_progress(spec.ProgressEvent)`,
checks `should_cancel()` between denoising steps (raising errors.Cancelled) and returns the frames
with the seed actually used and the time each stage took. It knows nothing of HTTP, Redis or RQ.

End-to-end latency features (issue 6):
- Stage profile in `result.timings`: text_encode, image_encode (I2V), denoise and each step (step_1 ...),
  vae_decode, and with `output_dir` encode_video and store (see `generate`).
- With `output_dir`, the VAE decodes latent frame by latent frame (`vae.decode_iter`), each chunk is
  converted to uint8 on the device and copied to pinned host memory asynchronously, and a writer thread
  encodes it to H.264 while later chunks decode: the MP4 is essentially done when decoding ends.
- Text encoder placement by configuration: "gpu" (bf16 resident on the pipeline's device), "gpu-fp8"
  (the same with weight-only fp8 block linears: 7.2 instead of 10.6 GiB for umT5-XXL) or "cpu" (encoder
  in host memory, embeddings moved over; frees ~11 GB), "auto" picks gpu or cpu from free GPU memory.
  The encoder's prompt cache makes repeated prompts free either way.
- `warmup()` runs a short generation at the preset's default size so kernels compile and autotune
  before the first request; optional `torch.compile` of the DiT forward (`compile_dit`).
- I2V expert residency (issue 5): "resident" (both experts on the GPU) or "swap" (idle expert in
  pinned host memory, switch streamed block by block under the outgoing expert's last step), chosen from
  free GPU memory or by configuration; see turbodiffusion_core/residency.py.

In-memory construction (benchmarks with random weights at the real shapes): build the modules yourself
and call `VideoPipeline(preset, text_encoder=..., vae=..., experts=..., device=..., dtype=...)` (alias
`VideoPipeline.from_modules`); everything above works the same.
"""

from __future__ import annotations

import gc
import logging
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import spec
from .errors import EngineError, ModelFilesMissing, UnsupportedRequest
from .residency import MODES as EXPERT_RESIDENCY_MODES
from .residency import ExpertResidency, choose_mode, module_bytes, same_device

log = logging.getLogger("turbodiffusion.pipeline")

ProgressFn = Callable[[spec.ProgressEvent], None]
CancelFn = Callable[[], bool]

TEXT_ENCODER_PLACEMENTS = ("auto", "gpu", "gpu-fp8", "cpu")
MP4_ENCODERS = ("process", "thread")
"""Where a video's streaming H.264 encode runs: a helper process (mp4_encoder.py; no GIL shared with the
Python that drives the GPU) or a thread of the worker."""
WARMUP_PROMPT = "warm-up: a calm lake at sunrise, gentle ripples, birds flying over the water"
_GIB = 2**30
# Working memory (activations, VAE decode) to keep free when deciding what else fits on the GPU, by the
# preset's largest resolution and model size (small = 1.3B). Estimates from the H100 runs: the 1.3B DiT
# forward at 480p needs ~1.6 GB of activations, 14B at 720p ~12 GB (dim 5120 vs 1536, 2.3x the tokens),
# the VAE decode a few GB at 720p (it runs after the DiT, not beside it).
RESERVE_GB = {("720p", False): 16.0, ("480p", False): 8.0, ("720p", True): 8.0, ("480p", True): 4.0,
              ("tiny", True): 0.25, ("tiny", False): 0.25}
PER_STEP_TIMINGS_MAX = 8  # steps with their own timing key; longer schedules report step_1 and step_mean


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    seed: int
    timings: dict[str, float]
    width: int
    height: int
    num_frames: int
    info: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # variant -> path, when generate() wrote outputs


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Torch-free, in spec so the CLI's `models` and the API use them too; re-exported here for the engine's callers.
default_models_dir = spec.default_models_dir
preset_paths = spec.preset_paths
missing_files = spec.missing_files


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory of a CUDA device as the driver sees it, plus what PyTorch's cache holds unused;
    None for a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def reserve_bytes_for(preset: spec.Preset, reserve_gb: Optional[float] = None) -> int:
    if reserve_gb is None:
        small = preset.tiny or "1.3b" in preset.arch
        reserve_gb = max(RESERVE_GB.get((r, small), 8.0) for r in preset.resolutions)
    return int(reserve_gb * _GIB)


def choose_text_encoder(requested: str, device: torch.device, *, encoder_bytes: int,
                        free_bytes: Optional[int], reserve_bytes: int) -> tuple[str, str]:
    """("gpu" | "gpu-fp8" | "cpu", why). "gpu" means the pipeline's device in bf16, "gpu-fp8" there with
    fp8 weights (only when configured); on a CPU pipeline the answer is "cpu". "auto" keeps the encoder on
    the GPU (bf16) when it fits beside `reserve_bytes` of working memory, else on the CPU."""
    if requested not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"text encoder placement must be one of {', '.join(TEXT_ENCODER_PLACEMENTS)}; "
                         f"got {requested!r}")
    if device.type != "cuda":
        return "cpu", "CPU pipeline"
    if requested != "auto":
        return requested, "configured"
    if free_bytes is None or free_bytes >= encoder_bytes + reserve_bytes:
        return "gpu", "fits"
    return "cpu", (f"free {free_bytes / _GIB:.1f} GiB < {(encoder_bytes + reserve_bytes) / _GIB:.1f} GiB "
                   "for the encoder and working memory")


class _Timer:
    """Wall-clock stage timings, synchronising CUDA so a stage's time is its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class _StepClock:
    """Per-step times without a host sync per step: CUDA events on a GPU, perf_counter on a CPU.
    `mark()` after each step; `seconds()` once the work is done (the stage timer has synchronised)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        pairs = zip(self.marks[:-1], self.marks[1:])
        if self.cuda:
            return [a.elapsed_time(b) / 1000.0 for a, b in pairs]
        return [b - a for a, b in pairs]


def _preview_writer(num_frames: int, paths: dict[str, Path], variants: Sequence[str]):
    """A `video.PreviewWriter` for the thumbnail and spritesheet among `variants`, or None if neither is wanted."""
    if not any(v in variants for v in ("thumbnail", "spritesheet")):
        return None
    from .video import PreviewWriter

    return PreviewWriter(num_frames, paths["thumbnail"] if "thumbnail" in variants else None,
                         paths["spritesheet"] if "spritesheet" in variants else None)


def _uint8_frames(chunk: torch.Tensor) -> torch.Tensor:
    """[B,3,t,H,W] in [-1,1] -> uint8 [t,H,W,3] of the first sample, on the chunk's device (the same
    arithmetic as video.frames_to_uint8)."""
    x = chunk[0].permute(1, 2, 3, 0).float()
    return ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).contiguous()


_BT709 = (0.2126, 0.7152, 0.0722)


def _yuv420_planes(u8: torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames [t,H,W,3] -> uint8 I420 frames [t, H*3/2, W] (video.Yuv420Frames): BT.709, limited
    range (Y 16-235, U/V 16-240), chroma the mean of each 2x2 block (the encoder's colour settings), computed
    where the frames are (the GPU), so the MP4 encoder does no colour conversion."""
    t, h, w, _ = u8.shape
    rgb = u8.permute(0, 3, 1, 2).float() * (1.0 / 255.0)  # [t,3,H,W]
    kr, kg, kb = _BT709
    luma = kr * rgb[:, 0] + kg * rgb[:, 1] + kb * rgb[:, 2]
    y = 16.0 + 219.0 * luma
    mean = F.avg_pool2d(rgb, 2)  # conversion is affine: converting the 2x2 mean = the mean of the converted
    mean_luma = kr * mean[:, 0] + kg * mean[:, 1] + kb * mean[:, 2]
    u = 128.0 + 224.0 * (mean[:, 2] - mean_luma) / (2.0 * (1.0 - kb))
    v = 128.0 + 224.0 * (mean[:, 0] - mean_luma) / (2.0 * (1.0 - kr))
    planes = torch.cat([y.reshape(t, -1), u.reshape(t, -1), v.reshape(t, -1)], dim=1)
    return planes.round_().clamp_(0, 255).to(torch.uint8).view(t, h * 3 // 2, w)


def quantized_format_for(device: torch.device) -> str:
    """What "auto" quantizes the block linears to on this CUDA device when bf16 does not fit (both halve them):
    int8 per channel where our Gluon wgmma GEMM runs it (Hopper, TD_INT8_KERNEL=rowcol and TD_INT8_GEMM=wgmma,
    the defaults), being there a little faster and closer to bf16 than fp8 (H100 1.3B forward, same run:
    136.4 vs 139.9 ms with sagesla, 171.9 vs 176.9 ms with sla, error vs diffusers 1.98e-2 vs 2.12e-2,
    bench/results/dit_h100_int8_vs_fp8.json; FFN-up linear against the bf16 one 1.5e-2 vs 3.7e-2,
    kernels_h100.json); fp8 through cuBLAS on the other GPUs from Ada on and with the slower int8 kernels;
    int8 before Ada (no fp8 tensor cores)."""
    from turbodiffusion_core.quant import rowcol_kernels, tile_int8, wgmma_int8

    fp8_ok = torch.cuda.get_device_capability(device) >= (8, 9)
    int8_fast = (wgmma_int8.available(device) and tile_int8.int8_kernel_choice() == "rowcol"
                 and rowcol_kernels.default_gemm_kernel() == "wgmma")
    return "int8" if int8_fast or not fp8_ok else "fp8"


def _auto_quant(preset: spec.Preset, device: torch.device, reserve_gb: Optional[float]) -> tuple[Optional[str], str]:
    from .memory_plan import choose_quant, dit_bytes, text_encoder_bytes, vae_bytes

    if device.type != "cuda":
        return None, "not a GPU"
    fp8_ok = quantized_format_for(device) == "fp8"
    free = free_device_bytes(device)
    vae = vae_bytes("tiny" if preset.tiny else "wan2.1")
    quant, why = choose_quant("auto", expert_bf16=dit_bytes(preset.arch, None),
                              expert_quantized=dit_bytes(preset.arch, "fp8" if fp8_ok else "int8"),
                              text_encoder=text_encoder_bytes("tiny" if preset.tiny else "umt5-xxl"),
                              free_bytes=None if free is None else free - vae,
                              reserve_bytes=reserve_bytes_for(preset, reserve_gb), fp8_ok=fp8_ok,
                              experts=2 if preset.task == "i2v" else 1)
    log.info("%s: quant=auto chose %s (%s)", preset.id, quant or "none (bf16)", why)
    return quant, why


@dataclass
class LoadPlan:
    """What loading a preset on a device resolves to: dtype, quantization and the files (checked present;
    tiny presets write theirs first). `VideoPipeline.from_preset` and the sequence-parallel ranks
    (parallel/runtime.py, which load only the DiT) share it, so every rank loads the same thing."""

    preset: spec.Preset
    device: torch.device
    dtype: torch.dtype
    quant: Optional[str]
    paths: dict[str, Path]
    quant_reason: str = "configured"

    @classmethod
    def prepare(cls, model_id: str, models_dir: Optional[Path], device: torch.device,
                dtype: Optional[torch.dtype] = None, quant: Optional[str] = None,
                reserve_gb: Optional[float] = None) -> "LoadPlan":
        """quant: None / "none" (bf16), "int8", "fp8", or "auto": bf16 when the first expert, the text
        encoder and the working reserve fit in the free GPU memory, else int8 on Hopper, fp8 on the other GPUs
        from Ada on, int8 before (`quantized_format_for`);
        memory_plan.py has the rules and their table."""
        preset = spec.get_preset(model_id)
        models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cpu":
            # Random or decaying activations reach subnormal floats, which x86 CPUs process ~100x slower.
            torch.set_flush_denormal(True)
        quant = None if quant == "none" else quant
        quant_reason = "configured" if quant else "default"
        if quant == "auto":
            quant, quant_reason = _auto_quant(preset, device, reserve_gb)
        if preset.tiny:
            from .tiny import ensure_tiny_files

            ensure_tiny_files(preset, models_dir)
        missing = missing_files(preset, models_dir, quant)
        if missing:
            raise ModelFilesMissing(
                f"{preset.id}: missing model files: {', '.join(missing)}. "
                f"Run `turbodiffusion download {preset.id} --models-dir {models_dir}` first."
            )
        return cls(preset, device, dtype, quant, preset_paths(preset, models_dir), quant_reason)

    @property
    def expert_roles(self) -> dict[str, str]:
        """Expert name -> file role: {"dit": "dit"}, or {"high": "dit_high", "low": "dit_low"} for I2V."""
        if self.preset.task == "i2v":
            return {"high": "dit_high", "low": "dit_low"}
        return {"dit": "dit"}

    def dit_file(self, role: str) -> Path:
        """The released `-quant` file when int8 is asked for and present, else the bf16 one."""
        twin = self.paths.get(f"{role}_quant")
        return twin if self.quant == "int8" and twin is not None and twin.exists() else self.paths[role]

    def load_dit(self, role: str, where: Optional[torch.device] = None):
        from .checkpoints import load_dit

        return load_dit(self.preset.arch, self.dit_file(role), device=where or self.device, dtype=self.dtype,
                        quant=self.quant)


class VideoPipeline:
    """Resident modules of one preset on one device, and the generation loop around them.

    The constructor is the in-memory path: give it built modules. Options:
        expert_residency: "auto" | "resident" | "swap" for two-expert (I2V) presets; "auto" decides
            from free device memory (residency.choose_mode), keeping `reserve_gb` free for activations.
        compile_dit: False, True (inductor) or a torch.compile backend name; applied to each expert's
            forward when the experts stay resident (swap moves weights under the forward, so not there).
        cuda_graphs: replay each expert's forward from CUDA graphs (cuda_graphs.GraphedForward) on a GPU,
            while the experts stay resident; not together with compile_dit.
    """

    def __init__(
        self,
        preset: Union[spec.Preset, str],
        *,
        text_encoder,
        vae,
        experts: dict,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "auto",
        quant: Optional[str] = None,
        expert_residency: str = "auto",
        residency_reason: Optional[str] = None,
        reserve_gb: Optional[float] = None,
        compile_dit: Union[bool, str] = False,
        text_encoder_reason: str = "as given",
        mp4_encoder: str = "thread",
        cuda_graphs: bool = True,
    ):
        if mp4_encoder not in MP4_ENCODERS:
            raise ValueError(f"mp4_encoder must be one of {', '.join(MP4_ENCODERS)}; got {mp4_encoder!r}")
        self.preset = spec.get_preset(preset) if isinstance(preset, str) else preset
        self.text_encoder = text_encoder
        self.vae = vae
        self.experts = experts  # {"dit": model} for T2V, {"high": model, "low": model} for I2V
        self.device = torch.device(device)
        self.dtype = dtype
        self.attention = attention
        self.quant = quant
        self.sequence_parallel = 1  # GPUs each DiT forward is spread over (parallel.runtime.shard_pipeline)
        self.load_seconds = 0.0
        self.warmup_seconds: Optional[float] = None
        self.text_encoder_reason = text_encoder_reason
        self.quant_reason = "as given"
        self.reserve_bytes = reserve_bytes_for(self.preset, reserve_gb)
        self.set_expert_residency(expert_residency, reason=residency_reason)
        self.compile_dit = compile_dit
        self.mp4_encoder = mp4_encoder
        self._encoder_process = None  # mp4_encoder.EncoderProcess, started by the first video (or warm-up)
        self._forward = dict(experts)
        if compile_dit:
            self._compile(compile_dit)
        self._graphed: dict = {}
        self.cuda_graphs_off_reason: Optional[str] = None  # set when graphs were turned off after loading
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if self.cuda_graphs and self.compile_dit:
            log.info("CUDA graphs off: torch.compile is on (one or the other)")
            self.cuda_graphs = False
        if self.cuda_graphs:
            from .cuda_graphs import GraphedForward

            pool = torch.cuda.graph_pool_handle()
            self._graphed = {name: GraphedForward(fn, pool=pool, name=name) for name, fn in self._forward.items()}
            log.info("DiT forward replayed from CUDA graphs (captured on the second call of each input shape)")

    def disable_cuda_graphs(self, reason: str) -> None:
        """Run the DiT eagerly from now on and give the graphs' memory back to the device."""
        if not self.cuda_graphs:
            return
        log.warning("CUDA graphs off: %s", reason)
        for graphed in self._graphed.values():
            graphed.reset()
        self._graphed = {}
        self.cuda_graphs = False
        self.cuda_graphs_off_reason = reason
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _graphs_off_text(self) -> str:
        return f"off: {self.cuda_graphs_off_reason}" if self.cuda_graphs_off_reason else "off"

    def _dit(self, name: str):
        """The callable that runs expert `name`'s forward: its CUDA-graph wrapper while the experts stay
        resident (weights that move would leave a graph reading their old place), else the forward."""
        graphed = self._graphed.get(name)
        if graphed is not None and not self.residency.swapping:
            return graphed
        return self._forward[name]

    @classmethod
    def from_modules(cls, preset: Union[spec.Preset, str], **kwargs) -> "VideoPipeline":
        """Same as the constructor (named for readability where modules are built in memory)."""
        return cls(preset, **kwargs)

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
        expert_residency: str = "auto",
        text_encoder: str = "auto",
        compile_dit: Union[bool, str] = False,
        reserve_gb: Optional[float] = None,
        vae_chunk_frames: int = 1,
        cudnn_benchmark: bool = False,
        mp4_encoder: str = "thread",
        cuda_graphs: bool = True,
    ) -> "VideoPipeline":
        from .models.text_encoder import TextEncoder
        from .models.vae import load_vae

        if expert_residency not in EXPERT_RESIDENCY_MODES:
            raise ValueError(f"expert_residency must be one of {', '.join(EXPERT_RESIDENCY_MODES)}")
        if text_encoder not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(f"text_encoder must be one of {', '.join(TEXT_ENCODER_PLACEMENTS)}")
        start = time.perf_counter()
        plan = LoadPlan.prepare(model_id, models_dir, pick_device(device), dtype, quant, reserve_gb=reserve_gb)
        preset, dev, dtype, quant, paths = plan.preset, plan.device, plan.dtype, plan.quant, plan.paths
        tiny = preset.tiny
        reserve = reserve_bytes_for(preset, reserve_gb)
        log.info("loading %s on %s (%s, attention=%s, quant=%s)", preset.id, dev, dtype, attention, quant or "none")

        vae = load_vae(paths["vae"], config="tiny" if tiny else "wan2.1", device=dev, dtype=dtype)
        vae.decode_chunk_frames = vae_chunk_frames
        if dev.type == "cuda":
            # cuDNN's algorithm search for the VAE's convolutions (shapes repeat per resolution; a warm-up
            # pays for the search)
            torch.backends.cudnn.benchmark = cudnn_benchmark

        # Order of priority for GPU memory: the first expert, the text encoder, the other expert (a
        # streamed expert switch hides under compute; a text encoder on the CPU costs seconds a prompt).
        roles = plan.expert_roles
        names = tuple(roles)
        experts = {names[0]: plan.load_dit(roles[names[0]], dev)}

        t5_bytes = paths["t5"].stat().st_size if paths["t5"].exists() else 0
        placement, te_reason = choose_text_encoder(
            text_encoder, dev, encoder_bytes=t5_bytes, free_bytes=free_device_bytes(dev), reserve_bytes=reserve)
        te_device = dev if placement in ("gpu", "gpu-fp8") else torch.device("cpu")
        te_dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        encoder = TextEncoder.from_files(
            paths["t5"], paths["tokenizer"], config="tiny" if tiny else "umt5-xxl", device=te_device, dtype=te_dtype,
            fp8=placement == "gpu-fp8",
        )
        log.info("text encoder on %s (%s)", te_device, te_reason)

        mode, reason = expert_residency, "configured"
        if len(names) > 1:
            mode, reason = choose_mode(expert_residency, experts=len(names),
                                       expert_bytes=module_bytes(experts[names[0]]),
                                       free_bytes=free_device_bytes(dev), reserve_bytes=reserve)
            for name in names[1:]:
                experts[name] = plan.load_dit(roles[name], dev if mode == "resident" else torch.device("cpu"))
        pipe = cls(preset, text_encoder=encoder, vae=vae, experts=experts, device=dev, dtype=dtype,
                   attention=attention, quant=quant, expert_residency=mode, residency_reason=reason,
                   reserve_gb=reserve / _GIB, compile_dit=compile_dit, text_encoder_reason=te_reason,
                   mp4_encoder=mp4_encoder, cuda_graphs=cuda_graphs)
        pipe.quant_reason = plan.quant_reason
        pipe.load_seconds = time.perf_counter() - start
        log.info("%s ready in %.1f s", preset.id, pipe.load_seconds)
        return pipe

    # ----------------------------------------------------------------------------------------
    def set_expert_residency(self, mode: str, reason: Optional[str] = None) -> str:
        """(Re)place the experts: "resident", "swap" or "auto" (from free device memory). Returns the mode."""
        old = getattr(self, "residency", None)
        for graphed in getattr(self, "_graphed", {}).values():
            graphed.reset()  # weights may move: no graph may keep reading where they were
        if old is not None:
            old.settle()
            old.ensure(old.home)
        if mode == "auto":
            home = next(iter(self.experts.values()))
            others_on_device = 0
            if old is None or not old.swapping:
                others_on_device = sum(module_bytes(m) for m in list(self.experts.values())[1:]
                                       if _device_of(m) is not None and same_device(_device_of(m), self.device))
            free = free_device_bytes(self.device)
            mode, reason = choose_mode("auto", experts=len(self.experts), expert_bytes=module_bytes(home),
                                       free_bytes=None if free is None else free + others_on_device,
                                       reserve_bytes=self.reserve_bytes)
        if old is not None and old.swapping:
            if mode == "swap":  # already swapping: keep the pinned copies
                old.reason = reason or old.reason
                return mode
            old.load_all()
        self.residency = ExpertResidency(self.experts, self.device, mode, reason or "configured")
        if len(self.experts) > 1:
            log.info("%s experts: %s (%s)", self.preset.id, self.residency.mode, self.residency.reason)
        return self.residency.mode

    def _compile(self, how: Union[bool, str]) -> None:
        if self.residency.swapping:
            log.warning("torch.compile skipped: the experts swap (weights move under the forward)")
            self.compile_dit = False
            return
        backend = how if isinstance(how, str) else "inductor"
        self._forward = {name: torch.compile(model, backend=backend, dynamic=False)
                         for name, model in self.experts.items()}
        log.info("DiT forward compiled with torch.compile (backend %s); the first request (or warmup) compiles",
                 backend)

    @property
    def text_encoder_placement(self) -> str:
        if self.text_encoder is None:
            return "none"
        if self.text_encoder.device.type != "cuda":
            return "cpu"
        return "gpu-fp8" if getattr(self.text_encoder, "fp8", False) else "gpu"

    def info(self) -> dict:
        out = {
            "model": self.preset.id,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention,
            "quant": self.quant or "none",
            "quant_reason": self.quant_reason,
            "gpus": self.sequence_parallel,
            "load_seconds": round(self.load_seconds, 3),
            "text_encoder": self.text_encoder_placement,
            "text_encoder_reason": self.text_encoder_reason,
            "compile": str(self.compile_dit) if self.compile_dit else "off",
            "cuda_graphs": ({name: g.stats() for name, g in self._graphed.items()} if self.cuda_graphs
                            else self._graphs_off_text()),
            "mp4_encoder": self.mp4_encoder,
            "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 3),
        }
        if len(self.experts) > 1:
            out["expert_residency"] = self.residency.mode
            out["expert_residency_detail"] = {**self.residency.describe(), **self.residency.stats()}
        cache = getattr(self.text_encoder, "cache_info", None)
        if cache is not None:
            out["prompt_cache"] = dict(cache()._asdict())
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
            out["memory_allocated_gb"] = round(torch.cuda.memory_allocated(self.device) / _GIB, 3)
            out["memory_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / _GIB, 3)
        return out

    # ----------------------------------------------------------------------------------------
    def _encode_prompt(self, text: str) -> torch.Tensor:
        """[1, text_len, d] on the device: zero-padded to the DiT's text length here rather than inside
        the DiT (the same numbers), so every prompt gives the DiT the same shapes (no torch.compile
        recompilation per prompt length)."""
        emb = self.text_encoder.encode([text])[0].to(self.device, self.dtype)
        text_len = getattr(getattr(next(iter(self.experts.values())), "cfg", None), "text_len", emb.shape[0])
        if emb.shape[0] < text_len:
            emb = torch.nn.functional.pad(emb, (0, 0, 0, text_len - emb.shape[0]))
        return emb.unsqueeze(0)

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

    def expert_plan(self, req: spec.ResolvedRequest) -> list[str]:
        """The expert of every step of an rCM request, known before sampling starts."""
        from .sampling.rcm import rcm_timesteps

        return [self.expert_for(t, req.boundary) for t in rcm_timesteps(req.steps, req.sigma_max)[:-1]]

    def generate(
        self,
        req: spec.ResolvedRequest,
        image=None,
        on_progress: Optional[ProgressFn] = None,
        should_cancel: Optional[CancelFn] = None,
        *,
        output_dir: Optional[Union[str, Path]] = None,
        stem: str = "video",
        variants: Sequence[str] = ("video", "thumbnail", "spritesheet"),
        prefix_frames: Optional[np.ndarray] = None,
    ) -> GenerationResult:
        """Run one request. Without `output_dir` it returns the frames (the caller writes files). With
        it, the MP4 is encoded on a thread while the VAE decodes, then the thumbnail and spritesheet are
        written (video.output_paths names: <stem>.mp4, <stem>_thumbnail.webp, <stem>_spritesheet.jpg);
        `result.files` maps each variant to its path, and the timings gain encode_video (MP4 time left
        after decoding ended) and store (the preview images), with encode_video_busy the writer's total.

        `prefix_frames` (uint8 [T, H, W, 3] at the request's size) extends a video: an I2V request whose
        image is the prefix's last frame continues it, and the result (frames and files) is the prefix
        followed by the new frames without their first one, which repeats that image."""
        if req.model != self.preset.id:
            raise EngineError(f"this pipeline serves {self.preset.id}, not {req.model}")
        if self.preset.task == "i2v" and image is None:
            raise EngineError(f"{self.preset.id} is an image-to-video model: give an input image")
        loaded = self.quant or "none"
        if req.quant is not None and req.quant != loaded:
            raise UnsupportedRequest(
                f"{self.preset.id} is loaded with quant={loaded} here; quant={req.quant} needs a worker started "
                f"with --quant {req.quant} (or leave quant unset to use whatever the worker runs)"
            )
        unknown = set(variants) - {"video", "thumbnail", "spritesheet"}
        if unknown:
            raise ValueError(f"unknown output variants {sorted(unknown)}")
        if prefix_frames is not None and (prefix_frames.dtype != np.uint8 or prefix_frames.ndim != 4
                                          or prefix_frames.shape[1:] != (req.height, req.width, 3)):
            raise EngineError(f"the video to extend is {list(prefix_frames.shape)} {prefix_frames.dtype}; "
                              f"expected uint8 [T, {req.height}, {req.width}, 3]")
        report = on_progress or (lambda ev: None)
        seed = req.seed or (secrets.randbits(63) or 1)
        timer = _Timer(self.device)
        expert_trace: list[str] = []
        files: dict[str, Path] = {}
        stats_before = self.residency.stats()

        mp4 = None
        paths = None
        previews = None
        if output_dir is not None:
            from .video import output_paths

            paths = output_paths(output_dir, stem)
            paths["video"].parent.mkdir(parents=True, exist_ok=True)
            if "video" in variants:
                # opened now so that an extension's prefix encodes while the model runs
                mp4 = self._open_mp4(paths["video"], req.width, req.height)
                if prefix_frames is not None:
                    mp4.put(prefix_frames)
            if prefix_frames is None:
                # built from the frames as they are decoded (an extension's video starts with the prefix:
                # its previews are made at the end from the whole video)
                previews = _preview_writer(req.num_frames, paths, variants)
        try:
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
                clock = None

                def step_done(i: int, n: int, t: float) -> None:
                    clock.mark()
                    report(spec.ProgressEvent("denoise", i / n, step=i, total_steps=n, info={"t": t}))

                report(spec.ProgressEvent("denoise", 0.0, step=0, total_steps=req.steps))
                with timer.stage("denoise"):
                    clock = _StepClock(self.device)
                    if self.preset.sampler == "rcm":
                        latent = self._sample_rcm(req, shape, generator, context, y, step_done, should_cancel,
                                                  expert_trace)
                    else:
                        latent = self._sample_unipc(req, shape, generator, context, negative, step_done,
                                                    should_cancel)
                steps = clock.seconds()
                if len(steps) <= PER_STEP_TIMINGS_MAX:
                    timer.timings.update({f"step_{i + 1}": s for i, s in enumerate(steps)})
                elif steps:
                    timer.timings.update(step_1=steps[0], step_mean=sum(steps[1:]) / max(1, len(steps) - 1))

                report(spec.ProgressEvent("vae_decode", 0.0))
                with timer.stage("vae_decode"):
                    frames = self._decode(latent, report, mp4, skip_first=prefix_frames is not None,
                                          previews=previews)
                if prefix_frames is not None:
                    frames = np.concatenate([prefix_frames, frames[1:]])
        except BaseException:
            if mp4 is not None:
                mp4.abort()
            if previews is not None:
                previews.discard()
            raise

        if paths is not None:
            files = self._finish_outputs(frames, paths, variants, mp4, timer, report, previews)
        info = {"experts": expert_trace} if expert_trace else {}
        if self.residency.swapping:
            after = self.residency.stats()
            info["expert_residency"] = {k: round(after[k] - stats_before[k], 3) for k in after}
        return GenerationResult(frames=frames, seed=seed, timings=timer.timings, width=req.width,
                                height=req.height, num_frames=len(frames), info=info, files=files)

    def _open_mp4(self, path: Path, width: int, height: int):
        """The streaming MP4 writer of one video: on the helper process (`mp4_encoder="process"`, see
        mp4_encoder.py) or on a thread of this process."""
        if self.mp4_encoder == "thread":
            from .video import Mp4Thread

            return Mp4Thread(path, width, height)
        if self._encoder_process is None:
            import weakref

            from .mp4_encoder import EncoderProcess

            self._encoder_process = EncoderProcess()
            weakref.finalize(self, self._encoder_process.close)
        return self._encoder_process.stream(path, width, height)

    def close(self) -> None:
        """Stop the MP4 helper process, if one runs (it also stops with this process)."""
        if self._encoder_process is not None:
            self._encoder_process.close()

    def _decode(self, latent: torch.Tensor, report: ProgressFn, mp4,
                skip_first: bool = False, previews=None) -> np.ndarray:
        """Decode chunk by chunk (`WanVAE.decode_iter`) into uint8 frames, handing each chunk to the MP4 writer
        (without the very first frame when `skip_first`: an extension's repeat of the frame it continues)
        and to `previews` (a `video.PreviewWriter`). On a GPU each chunk's uint8 copy to pinned host memory,
        and the CPU work on the chunk before it, run while the next chunk decodes."""
        from .models.vae import latent_frames_decoded
        from .video import Yuv420Frames

        cfg = self.vae.config
        _, _, t_lat, h, w = latent.shape
        frames = np.empty((1 + cfg.temporal_factor * (t_lat - 1), h * cfg.spatial_factor,
                           w * cfg.spatial_factor, 3), dtype=np.uint8)
        cuda = latent.device.type == "cuda"
        filled = 0
        pending = None  # (host uint8 RGB, host I420 or None, event) of the chunk before the current one
        decoded = 0  # pixel frames the VAE has produced so far

        def land(host: torch.Tensor, yuv: Optional[torch.Tensor], event) -> None:
            nonlocal filled
            if event is not None:
                event.synchronize()
            n = host.shape[0]
            frames[filled:filled + n] = host.numpy()
            if mp4 is not None:
                first = 1 if skip_first and filled == 0 else 0
                if n > first:
                    mp4.put(Yuv420Frames(yuv.numpy()[first:]))
            if previews is not None:
                previews.add(frames[filled:filled + n], filled)
            filled += n

        for chunk in self.vae.decode_iter(latent.to(self.vae_dtype)):
            u8 = _uint8_frames(chunk)
            # the MP4 writer (thread or helper process) takes I420 frames converted here, on the GPU
            yuv = _yuv420_planes(u8) if mp4 is not None else None
            if cuda:
                host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(u8, non_blocking=True)
                if yuv is not None:
                    yuv_host = torch.empty(yuv.shape, dtype=torch.uint8, pin_memory=True)
                    yuv = yuv_host.copy_(yuv, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = u8, None
            if pending is not None:
                land(*pending)
            pending = (host, yuv, event)
            decoded += chunk.shape[2]
            report(spec.ProgressEvent("vae_decode", latent_frames_decoded(decoded, cfg.temporal_factor) / t_lat))
        if pending is not None:
            land(*pending)
        if filled != len(frames):
            raise EngineError(f"VAE decode gave {filled} frames, expected {len(frames)}")
        return frames

    def _finish_outputs(self, frames: np.ndarray, paths: dict[str, Path], variants: Sequence[str],
                        mp4, timer: _Timer, report: ProgressFn,
                        previews=None) -> dict[str, Path]:
        """After decoding: what is left of the preview images (all of them, unless `previews` was fed during
        the decode) on a thread while the MP4 finishes; time what is left of each."""
        errors: list[BaseException] = []
        writer, whole_video = previews, False
        if writer is None:
            writer, whole_video = _preview_writer(len(frames), paths, variants), True

        def finish_previews() -> None:
            try:
                if writer is not None:
                    if whole_video:
                        writer.add(frames, 0)
                    writer.finish()
            except BaseException as exc:
                errors.append(exc)

        report(spec.ProgressEvent("encode_video", 0.0))
        started = time.perf_counter()
        side = threading.Thread(target=finish_previews, name="previews", daemon=True)
        side.start()
        written: dict[str, Path] = {}
        try:
            if mp4 is not None:
                written["video"] = mp4.finish()
                timer.timings["encode_video_busy"] = mp4.busy
            timer.timings["encode_video"] = time.perf_counter() - started
            report(spec.ProgressEvent("store", 0.0))
            mark = time.perf_counter()
            side.join()
            timer.timings["store"] = time.perf_counter() - mark
            if errors:
                raise errors[0]
        except BaseException:
            side.join()
            for variant in ("video", "thumbnail", "spritesheet"):
                paths[variant].unlink(missing_ok=True)
            raise
        written.update({v: paths[v] for v in ("thumbnail", "spritesheet") if v in variants})
        return written

    def _dit_kwargs(self, req: spec.ResolvedRequest) -> dict:
        return {"attention": req.attention_type if req.attention_type != "auto" else self.attention,
                "sla_topk": req.sla_topk}

    def _sample_rcm(self, req, shape, generator, context, y, step_done, should_cancel, expert_trace):
        from .sampling.rcm import rcm_sample

        kwargs = self._dit_kwargs(req)
        plan = self.expert_plan(req)
        residency = self.residency

        def select(i: int, t_cur: float) -> None:
            # The expert of this step must be on the device; if a different one runs next (or, after the
            # last step, the home expert the next request starts with), stream it in under this step.
            residency.ensure(plan[i])
            after = plan[i + 1] if i + 1 < len(plan) else residency.home
            if after != plan[i]:
                residency.arm_switch(plan[i], after)

        def denoise(x, t_input, step_index, t_cur):
            name = plan[step_index]
            expert_trace.append(name)
            return self._dit(name)(x.to(self.dtype), t_input.to(self.dtype), context, y=y, **kwargs)

        try:
            return rcm_sample(
                denoise, shape, steps=req.steps, sigma_max=req.sigma_max, generator=generator, device=self.device,
                ode=req.ode, model_dtype=self.dtype, on_step=step_done, should_cancel=should_cancel,
                select_fn=select,
            )
        finally:
            residency.settle()

    def _sample_unipc(self, req, shape, generator, context, negative, step_done, should_cancel):
        from .sampling.unipc import unipc_sample

        kwargs = self._dit_kwargs(req)
        model = self._dit("dit")
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

    # ----------------------------------------------------------------------------------------
    def warmup_request(self, steps: Optional[int] = None) -> tuple[spec.ResolvedRequest, object]:
        """The request (and I2V image) `warmup` runs: the preset's default size and frame count, so the
        kernels autotune for the shapes real requests use; I2V runs every default step so both experts
        and the expert switch run, T2V one step (every step runs the same kernels), two with CUDA graphs (the
        second call of a shape captures its graph)."""
        p = self.preset
        if steps is None:
            two = p.sampler == "unipc" or getattr(self, "cuda_graphs", False)
            steps = p.default_steps if p.task == "i2v" else (2 if two else 1)
        width, height = p.size_for(p.default_resolution, "16:9")
        req = spec.resolve(spec.GenerationRequest(prompt=WARMUP_PROMPT, model=p.id, seed=1, steps=steps,
                                                  num_frames=p.default_frames, ode=True))
        image = None
        if p.task == "i2v":
            from PIL import Image

            image = Image.new("RGB", (width, height), (120, 128, 136))
        return req, image

    def warmup(self, steps: Optional[int] = None) -> dict[str, float]:
        """One short generation (written to a temporary folder, then deleted) so CUDA kernels, Triton
        autotuning, cuDNN plans, torch.compile and the MP4 encoder are ready before the first request."""
        req, image = self.warmup_request(steps)

        def run() -> GenerationResult:
            with tempfile.TemporaryDirectory(prefix="td-warmup-") as folder:
                return self.generate(req, image=image, output_dir=folder)

        start = time.perf_counter()
        try:
            result = run()
        except torch.OutOfMemoryError:
            if not self.cuda_graphs:
                raise
            # A graph keeps its activations in its own memory pool, which the VAE decode cannot borrow: on a
            # card with room for the eager forward and the decode but not for both at once, run eagerly.
            self.disable_cuda_graphs("out of GPU memory in the warm-up with them (their pool is not shared "
                                     "with the VAE decode)")
            result = run()
        self.warmup_seconds = time.perf_counter() - start
        log.info("%s warmed up in %.1f s (%s)", self.preset.id, self.warmup_seconds,
                 ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
        return result.timings


def _device_of(model: torch.nn.Module) -> Optional[torch.device]:
    for tensor in model.parameters():
        return tensor.device
    return None


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
    *,
    expert_residency: str = "auto",
    text_encoder: str = "auto",
    compile_dit: Union[bool, str] = False,
    reserve_gb: Optional[float] = None,
    vae_chunk_frames: int = 1,
    cudnn_benchmark: bool = False,
    mp4_encoder: str = "thread",
    cuda_graphs: bool = True,
) -> VideoPipeline:
    """Build the resident pipeline of one preset (see module docstring)."""
    return VideoPipeline.from_preset(model_id, models_dir=models_dir, device=device, attention=attention,
                                     quant=quant, dtype=dtype, expert_residency=expert_residency,
                                     text_encoder=text_encoder, compile_dit=compile_dit, reserve_gb=reserve_gb,
                                     vae_chunk_frames=vae_chunk_frames, cudnn_benchmark=cudnn_benchmark,
                                     mp4_encoder=mp4_encoder, cuda_graphs=cuda_graphs)
