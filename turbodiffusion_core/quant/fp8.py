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
from torch import nn

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


class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear with an e4m3 weight and per-output-channel scales (buffers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: Optional[torch.device | str] = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        bias_tensor = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize a float Linear (a meta Linear gives an empty meta module, to be filled by a load)."""
        weight = linear.weight
        bias_dtype = linear.bias.dtype if linear.bias is not None else weight.dtype
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device=weight.device, bias_dtype=bias_dtype,
        )
        if weight.is_meta:
            return module
        q, scale = quantize_fp8_rowwise(weight.detach())
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor, act: Optional[str] = None) -> torch.Tensor:
        """W8A8 on the GPU (activations quantized per row on the fly, `act` fused into that pass);
        elsewhere the weight-only reference: dequantize the weight and multiply in x's dtype."""
        from turbodiffusion_core.kernels.triton_support import kernels_usable

        if x.is_cuda and kernels_usable(x):
            from turbodiffusion_core.quant.kernels import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale, self.bias, act=act).to(x.dtype)
        if act == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        weight = dequantize_fp8_rowwise(self.weight, self.weight_scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
