"""What fits on a GPU of a given size: quantization, text-encoder placement and I2V expert residency.

The loader (pipeline.VideoPipeline.from_preset) makes these choices from the free memory it measures when
it starts, in the order the memory goes: the first DiT expert, then the umT5 text encoder, then any other
expert, each next to a reserve of working memory for activations and the VAE decode (pipeline.RESERVE_GB).
This module makes the same choices for a *given* memory size, so the README's profile table and
`turbodiffusion plan --gpu-gb 24` show, before anything is loaded, what each preset becomes on a 16, 24,
40 or 80 GB card:

- quant "auto": bf16 weights when every expert, the text encoder and the reserve fit in bf16 (best
  quality); otherwise the experts' block linears in int8 (per channel; on Hopper, where our Gluon GEMM
  makes it the faster of the two, and on GPUs before Ada) or fp8 (e4m3, Ada and newer but not Hopper),
  which halves them (for I2V: two quantized experts resident rather than one bf16
  expert streamed in and out on every request).
- text encoder "auto": on the GPU when it fits beside the expert(s) and the reserve, else in host memory
  (a new prompt then takes seconds; repeated prompts come from the embedding cache). "gpu-fp8" (only when
  configured) keeps it on the GPU with fp8 block weights, about half the size.
- expert residency "auto" (two-expert I2V): both experts on the GPU when they fit, else the idle one in
  pinned host memory, streamed in block by block during the last step before the switch.

Weight sizes are exact (the modules are built on the meta device and their tensors counted); the working
memory is the loader's reserve, which was calibrated on the H100 measurement of the 1.3B model at 480p
(5.75 GB peak with the encoder on the CPU: ~1.5 GB of fp8 weights and ~4 GB of activations and VAE decode).
Peaks of the other presets are estimates until bench/bench_e2e.py measures them.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Optional

from turbodiffusion_core import spec

GIB = 2**30
QUANT_CHOICES = ("auto", "none", "int8", "fp8")


@functools.lru_cache(maxsize=None)
def dit_bytes(arch: str, quant: Optional[str] = None) -> int:
    """Bytes of one DiT's weights as the pipeline holds them on the GPU (bf16; block linears quantized
    with `quant`), counted on a meta-device build. TurboDiffusion checkpoints carry SLA projections."""
    from turbodiffusion_core.models.dit import WanModel, runtime_dtype

    import torch

    model = WanModel.on_meta(arch, with_sla_proj=True, quant=quant)
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        dtype = runtime_dtype(name, tensor.dtype, torch.bfloat16)
        total += tensor.numel() * torch.empty((), dtype=dtype).element_size()
    return total


@functools.lru_cache(maxsize=None)
def text_encoder_bytes(config: str = "umt5-xxl", fp8: bool = False) -> int:
    """Bytes of the umT5 encoder in bf16 (the embedding table is shared, counted once), or with its block
    linears in fp8 (placement "gpu-fp8")."""
    from turbodiffusion_core.models.text_encoder import build_umt5_on_meta, quantize_umt5_fp8

    import torch

    model = build_umt5_on_meta(config)
    if fp8:
        quantize_umt5_fp8(model)
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = 2 if tensor.dtype == torch.float32 else tensor.element_size()  # float weights are loaded in bf16
        total += tensor.numel() * size
    return total


@functools.lru_cache(maxsize=None)
def vae_bytes(config: str = "wan2.1") -> int:
    """Bytes of the Wan2.1 VAE in bf16."""
    import torch

    from turbodiffusion_core.models.vae import VAE_CONFIGS, WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAE_CONFIGS[config])
    return sum(t.numel() for t in [*vae.parameters(), *vae.buffers()]) * 2


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    gpu_gb: float
    quant: Optional[str]
    text_encoder: str  # "gpu" | "gpu-fp8" | "cpu"
    expert_residency: str  # "resident" | "swap" (one-expert presets: "resident")
    weights_gb: float  # on the GPU
    reserve_gb: float  # working memory kept for activations and the VAE decode
    peak_gb: float  # weights + reserve: the estimated peak
    fits: bool
    notes: str

    def as_dict(self) -> dict:
        return asdict(self)


def choose_quant(requested: Optional[str], *, expert_bf16: int, expert_quantized: int, text_encoder: int,
                 free_bytes: Optional[int], reserve_bytes: int, fp8_ok: bool,
                 experts: int = 1) -> tuple[Optional[str], str]:
    """(quant, why) for `requested` in QUANT_CHOICES (None = "none"). "auto" keeps bf16 when all `experts`,
    the text encoder and the reserve fit in `free_bytes` (None: not a GPU, keep bf16)."""
    if requested in (None, "none"):
        return None, "configured" if requested else "default"
    if requested not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}; got {requested!r}")
    if requested != "auto":
        return requested, "configured"
    if free_bytes is None:
        return None, "not a GPU"
    quantized = "fp8" if fp8_ok else "int8"
    need = experts * expert_bf16 + text_encoder + reserve_bytes
    if free_bytes >= need:
        return None, f"bf16 fits: {free_bytes / GIB:.1f} GiB free >= {need / GIB:.1f} GiB"
    return quantized, (f"{free_bytes / GIB:.1f} GiB free < {need / GIB:.1f} GiB for bf16 weights, the text encoder "
                       f"and working memory; {quantized} halves the DiT linears "
                       f"({expert_bf16 / GIB:.1f} -> {expert_quantized / GIB:.1f} GiB)")


def plan(model: str, gpu_gb: float, *, quant: Optional[str] = "auto", text_encoder: str = "auto",
         expert_residency: str = "auto", fp8_ok: bool = True, reserve_gb: Optional[float] = None) -> MemoryPlan:
    """What `model` becomes on a GPU with `gpu_gb` GiB free, with the loader's rules (module docstring)."""
    from turbodiffusion_core.pipeline import choose_text_encoder, reserve_bytes_for
    from turbodiffusion_core.residency import choose_mode

    import torch

    preset = spec.get_preset(model)
    free = int(gpu_gb * GIB)
    reserve = reserve_bytes_for(preset, reserve_gb)
    experts = 2 if preset.task == "i2v" else 1
    t5 = text_encoder_bytes("tiny" if preset.tiny else "umt5-xxl")
    vae = vae_bytes("tiny" if preset.tiny else "wan2.1")
    bf16 = dit_bytes(preset.arch, None)
    quant_name, quant_why = choose_quant(quant, expert_bf16=bf16,
                                         expert_quantized=dit_bytes(preset.arch, "fp8" if fp8_ok else "int8"),
                                         text_encoder=t5, free_bytes=free - vae, reserve_bytes=reserve,
                                         fp8_ok=fp8_ok, experts=experts)
    expert = dit_bytes(preset.arch, quant_name)
    cuda = torch.device("cuda")
    left = free - vae - expert
    placement, t5_why = choose_text_encoder(text_encoder, cuda, encoder_bytes=t5, free_bytes=left,
                                            reserve_bytes=reserve)
    if placement == "gpu-fp8":
        t5 = text_encoder_bytes("tiny" if preset.tiny else "umt5-xxl", fp8=True)
    if placement != "cpu":
        left -= t5
    mode, mode_why = choose_mode(expert_residency, experts=experts, expert_bytes=expert, free_bytes=left,
                                 reserve_bytes=reserve)
    weights = vae + expert + (0 if placement == "cpu" else t5)
    if mode == "resident":
        weights += (experts - 1) * expert
    else:
        weights += max(expert // 40, 1)  # the block in flight during a streamed switch (~1/40 of an expert)
    peak = weights + reserve
    notes = [f"quant: {quant_why}", f"text encoder: {t5_why}"]
    if experts > 1:
        notes.append(f"experts: {mode_why}")
    return MemoryPlan(model=preset.id, gpu_gb=gpu_gb, quant=quant_name, text_encoder=placement,
                      expert_residency=mode, weights_gb=round(weights / GIB, 2), reserve_gb=round(reserve / GIB, 2),
                      peak_gb=round(peak / GIB, 2), fits=peak <= free, notes="; ".join(notes))
