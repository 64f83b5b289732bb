"""Per-channel W8A8 ("rowcol"): the int8 layout our fast Hopper GEMM runs, and its exact PyTorch reference.

Weight: int8 [out, in] with one float32 scale per output channel. Activation: int8 [M, K] with one float32
scale per row (token), quantized on every call. Both use the same symmetric rule: amax of the row, floored
at 1e-8; q = x * (127/amax) rounded to nearest-even and clamped to [-127, 127] (nothing saturates: the
largest value maps to 127 exactly); stored scale = amax/127.

Because the scales do not change along K, the whole K reduction is one int32 sum, and the product is
    Y[m, n] = float(sum_k qA[m, k] * qW[n, k]) * sA[m] * sW[n] + bias[n]
(int32 holds it exactly for K up to 133,000: |q| <= 127). On a GPU that is a plain int8 GEMM with
int32 accumulation and a scaling epilogue, which is what makes it fast on Hopper; the tile format
(tile_int8.py) needs a float rescale after every 128-wide K step instead.

The released `-quant` checkpoints hold the tile format. `channel_int8_from_tiles` turns a tile-quantized
weight into this layout (dequantize the tiles, re-quantize each output channel); `TileInt8Linear` does
that once on the GPU when the rowcol kernel is selected (see its docstring).
"""

from __future__ import annotations

from typing import Optional

import torch

from turbodiffusion_core.quant.base import QuantizedRows

ROW_QMAX = 127.0
AMAX_FLOOR = 1e-8
EXACT_CHUNK = 128
"""K columns per float32 matmul in `int8_matmul_exact`: 128 products of |q| <= 128 sum below 2^24."""
MAX_K = (2**31 - 1) // (127 * 127)
"""Longest K whose int32 dot products cannot overflow (133,144)."""


def quantize_int8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [rows, cols] -> (int8 [rows, cols], float32 scale [rows]) with x ~= q * scale[:, None]."""
    xf = x.float()
    amax = xf.abs().amax(dim=1).clamp_min(AMAX_FLOOR)
    inv = torch.full_like(amax, ROW_QMAX) / amax  # (`127 / tensor` would be 127 * (1/amax): two roundings)
    q = torch.round(xf * inv[:, None]).clamp_(-ROW_QMAX, ROW_QMAX).to(torch.int8)
    return q, amax / ROW_QMAX


def dequantize_int8_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8Rows(QuantizedRows):
    """int8 rows with their scales by this module's rule, as `kernels.norm.residual_layernorm(out_dtype=
    torch.int8)` writes them: the input a per-channel `TileInt8Linear` takes in place of x."""


def channel_int8_from_tiles(q_tiles: torch.Tensor, tile_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 128x128-tile int8 weight (tile_int8.py) re-quantized per output channel: (int8 [out, in], scale [out])."""
    from turbodiffusion_core.quant.tile_int8 import dequantize_tile_int8

    return quantize_int8_rowwise(dequantize_tile_int8(q_tiles, tile_scale))


def int8_matmul_exact(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> the exact int32 [M, N] products, on any device.

    Each 128-column slice is a float32 matmul of small integers (exact: partial sums stay below 2^24 in
    any summation order); the slices are added in int32.
    """
    out = torch.zeros(q_a.shape[0], q_b.shape[0], dtype=torch.int32, device=q_a.device)
    for start in range(0, q_a.shape[1], EXACT_CHUNK):
        cols = slice(start, start + EXACT_CHUNK)
        out += (q_a[:, cols].float() @ q_b[:, cols].float().t()).to(torch.int32)
    return out


def w8a8_rowcol_reference(
    x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Exact rowcol W8A8 math: x [..., K] with int8 weight [N, K] and channel scales [N] -> [..., N] in x's dtype.

    The float steps are the kernel's, in its order: float32(int32 sum) * sA * sW, + bias, cast.
    """
    out_features, in_features = q_weight.shape
    lead = x.shape[:-1]
    q_act, a_scale = quantize_int8_rowwise(x.reshape(-1, in_features))
    out = w8a8_rowcol_from_rows(q_act, a_scale, q_weight, w_scale, bias, x.dtype)
    return out.reshape(*lead, out_features)


def w8a8_rowcol_from_rows(
    q_act: torch.Tensor, a_scale: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor], out_dtype: torch.dtype,
) -> torch.Tensor:
    """The same product for rows quantized already (int8 [M, K], scales [M]): what `int8_rowcol_matmul` computes."""
    out = int8_matmul_exact(q_act, q_weight).float() * a_scale.float().reshape(-1, 1) * w_scale.float()[None, :]
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


__all__ = [
    "Int8Rows",
    "MAX_K",
    "channel_int8_from_tiles",
    "dequantize_int8_rowwise",
    "int8_matmul_exact",
    "quantize_int8_rowwise",
    "w8a8_rowcol_from_rows",
    "w8a8_rowcol_reference",
]
