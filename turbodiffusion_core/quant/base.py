"""What every quantized drop-in for nn.Linear shares: the shape attributes, a `bias` buffer kept in a float
dtype, building from a float Linear, and the choice between the GPU kernel and the PyTorch reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class QuantizedRows:
    """Activations that arrive already quantized, one float32 scale per row (x ~= data * scale): what the fused
    LayerNorm kernel writes so that the linears reading one normalised tensor (q, k and v) skip quantizing
    it again each. `data` [..., K] (e4m3 or int8); `scale` float32 [M, 1] for its M rows; `dtype`: what the
    linear returns. Subclasses name the format a layer accepts."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        """Where the rows live (what `kernels_usable` and the DiT's fused-path check read)."""
        return self.data.device

    def dequantize(self) -> torch.Tensor:
        rows = self.data.reshape(-1, self.data.shape[-1]).float() * self.scale.reshape(-1, 1).float()
        return rows.reshape(self.data.shape).to(self.dtype)


class QuantizedLinear(nn.Module):
    """Subclasses implement `register_weight(device)` (register their weight payload buffers, empty),
    `set_weight(weight)` (quantize a float weight into them), `kernel_forward` (CUDA) and
    `reference_forward` (anywhere)."""

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
        bias_tensor = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)
        self.register_weight(device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        """Quantize a float Linear (a meta Linear gives an empty meta module, to be filled by a load)."""
        weight = linear.weight
        bias_dtype = linear.bias.dtype if linear.bias is not None else weight.dtype
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device=weight.device, bias_dtype=bias_dtype,
        )
        if weight.is_meta:
            return module
        module.set_weight(weight.detach())
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def register_weight(self, device: Optional[torch.device | str]) -> None:
        raise NotImplementedError

    def set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def kernel_forward(self, x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
        raise NotImplementedError

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | QuantizedRows, act: Optional[str] = None) -> torch.Tensor:
        """`act` ("gelu_tanh") is applied to x first: fused into the activation quantizer on the GPU. Rows the
        kernel before this layer quantized already (`QuantizedRows`) go to `rows_forward`."""
        if isinstance(x, QuantizedRows):
            if act is not None:
                raise ValueError("no activation can be applied to already quantized rows")
            return self.rows_forward(x)
        from turbodiffusion_core.kernels.triton_support import kernels_usable

        if x.is_cuda and kernels_usable(x):
            return self.kernel_forward(x, act)
        if act == "gelu_tanh":
            x = nn.functional.gelu(x, approximate="tanh")
        return self.reference_forward(x)

    def rows_forward(self, rows: QuantizedRows) -> torch.Tensor:
        """The layer on pre-quantized rows; layers that take a rows format (their `takes_*_rows`) override it."""
        raise ValueError(f"{type(self).__name__} does not take pre-quantized {type(rows).__name__}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
