"""TurboDiffusion's W8A8 linear: int8 weights and activations, one scale per 128x128 tile.

The layout is the one of the released `-quant` checkpoints (reference/turbodiffusion.md §2.2, §4), so
those files load as they are: each quantized Linear stores `int8_weight` (int8 [out, in]), `scale`
(float32 [ceil(out/128), ceil(in/128)], amax/128 of each weight tile) and `bias`.

Quantizing a tile: amax = max(|x|) over the tile, floored at 1e-8; q = x * (128/amax) rounded to
nearest-even and saturated to [-128, 127] (so only x = +amax clips, to 127); stored scale = amax/128.
Activations are quantized the same way on every call, per 128x128 tile of the flattened (M, K) input,
and the product is Y[m, n] = sum over K tiles kb of sA[m/128, kb] * sW[n/128, kb] * (qA . qW)[kb].

What is here is the exact PyTorch reference of that math (the CPU path and the ground truth for a
fused GPU kernel): per K tile, the int8 dot products are computed as float32 matmuls of integers, which
are exact because a 128-term sum of int8 products stays below 2^24.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from turbodiffusion_core.quant.base import QuantizedLinear

TILE = 128
INT8_QMAX = 128.0
"""Divisor of amax: TurboDiffusion scales to +-128 and lets +128 saturate to 127."""
AMAX_FLOOR = 1e-8


def _tile_grid(rows: int, cols: int) -> tuple[int, int]:
    return math.ceil(rows / TILE), math.ceil(cols / TILE)


def quantize_tile_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (q int8 same shape, scale float32 [ceil(rows/128), ceil(cols/128)])."""
    rows, cols = x.shape
    grid_r, grid_c = _tile_grid(rows, cols)
    padded = F.pad(x.float(), (0, grid_c * TILE - cols, 0, grid_r * TILE - rows))
    tiles = padded.view(grid_r, TILE, grid_c, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    q = torch.round(tiles * (INT8_QMAX / amax)[:, None, :, None]).clamp_(-128, 127).to(torch.int8)
    q = q.view(grid_r * TILE, grid_c * TILE)[:rows, :cols].contiguous()
    return q, amax / INT8_QMAX


def _expand_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Tile scales [R, C] -> per-row scales [rows, C] (each tile row repeated 128 times)."""
    return scale.repeat_interleave(TILE, dim=0)[:rows]


def dequantize_tile_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tile_int8` up to rounding: float32 with q's shape."""
    rows, cols = q.shape
    full = _expand_scale(scale, rows).repeat_interleave(TILE, dim=1)[:, :cols]
    return q.float() * full


def w8a8_tile_reference(
    x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Exact W8A8 tile math: x [..., K] with int8 weight [N, K] and tile scales -> [..., N] in x's dtype."""
    out_features, in_features = q_weight.shape
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_features)
    q_act, a_scale = quantize_tile_int8(flat)
    row_scale = _expand_scale(a_scale, flat.shape[0])  # [M, K tiles]
    col_scale = _expand_scale(w_scale.float(), out_features)  # [N, K tiles]
    out = torch.zeros(flat.shape[0], out_features, dtype=torch.float32, device=x.device)
    for kb in range(math.ceil(in_features / TILE)):
        cols = slice(kb * TILE, (kb + 1) * TILE)
        exact = q_act[:, cols].float() @ q_weight[:, cols].float().t()
        out += exact * row_scale[:, kb : kb + 1] * col_scale[:, kb]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, out_features)


class TileInt8Linear(QuantizedLinear):
    """Drop-in for nn.Linear holding TurboDiffusion's int8 tile-quantized weight (buffers, as in the files).
    The TurboDiffusion W8A8 math: the Triton tile GEMM on the GPU, the PyTorch reference elsewhere."""

    def register_weight(self, device: Optional[torch.device | str]) -> None:
        shape = (self.out_features, self.in_features)
        self.register_buffer("int8_weight", torch.empty(shape, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(_tile_grid(*shape), dtype=torch.float32, device=device))

    def set_weight(self, weight: torch.Tensor) -> None:
        q, scale = quantize_tile_int8(weight)
        self.int8_weight.copy_(q)
        self.scale.copy_(scale)

    def kernel_forward(self, x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
        from turbodiffusion_core.quant.kernels import int8_tile_linear

        return int8_tile_linear(x, self.int8_weight, self.scale, self.bias, act=act)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_tile_reference(x, self.int8_weight, self.scale, self.bias)
