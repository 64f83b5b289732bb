"""FP8 (e4m3) weight-quantized linear, for load-time quantization of a bf16 checkpoint.

No released checkpoint uses FP8; this is our own option because on Hopper an e4m3 GEMM measured
1.66x a bf16 one at the Wan FFN shape (design.md §2), while int8 was slower than bf16. The weight is
stored as float8_e4m3fn with one float32 scale per output channel (amax/448, the e4m3 maximum); the
state-dict keys are `weight`, `weight_scale`, `bias`.

The forward here is the reference: dequantize the weight to the activation dtype and run a normal
matmul. It runs anywhere and defines the numbers a fused FP8 GEMM must reproduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from turbodiffusion_core.quant.base import QuantizedLinear, QuantizedRows

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12


def quantize_fp8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], float32 scale [out]) with weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(AMAX_FLOOR) / E4M3_MAX
    q = (w / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Fp8Rows(QuantizedRows):
    """e4m3 rows with their scales, as `kernels.norm.residual_layernorm(out_dtype=torch.float8_e4m3fn)` writes
    them: the input `Fp8Linear` takes in place of x."""


class Fp8Linear(QuantizedLinear):
    """Drop-in for nn.Linear with an e4m3 weight and per-output-channel scales (buffers). W8A8 on the GPU
    (activations quantized per row on the fly; fast accumulation unless TD_FP8_EXACT_ACCUM=1, see
    quant/kernels.py); elsewhere the weight-only reference: dequantize the weight and multiply in x's dtype.
    Also takes `Fp8Rows` (activations the previous kernel already quantized) in place of x."""

    takes_fp8_rows = True

    def rows_forward(self, rows: QuantizedRows) -> torch.Tensor:
        if not isinstance(rows, Fp8Rows):
            return super().rows_forward(rows)
        if rows.data.is_cuda:
            from turbodiffusion_core.quant.kernels import fp8_matmul

            return fp8_matmul(rows.data, rows.scale, self.weight, self.weight_scale, self.bias).to(rows.dtype)
        return self.reference_forward(rows.dequantize())

    def register_weight(self, device: Optional[torch.device | str]) -> None:
        shape = (self.out_features, self.in_features)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.empty(self.out_features, dtype=torch.float32, device=device))

    def set_weight(self, weight: torch.Tensor) -> None:
        q, scale = quantize_fp8_rowwise(weight)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)

    def kernel_forward(self, x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
        from turbodiffusion_core.quant.kernels import fp8_linear

        return fp8_linear(x, self.weight, self.weight_scale, self.bias, act=act).to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_fp8_rowwise(self.weight, self.weight_scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class Fp8WeightOnlyLinear(Fp8Linear):
    """The same e4m3 weight with per-channel scales, always run weight-only: dequantized to the activation's
    dtype for each matmul, activations never quantized. Halves the memory of a model whose speed does not
    matter but whose activations are sensitive (the umT5 text encoder: `--text-encoder gpu-fp8`)."""

    takes_fp8_rows = False

    def forward(self, x: torch.Tensor, act: Optional[str] = None) -> torch.Tensor:
        if act == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        return self.reference_forward(x)
