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

Which int8 kernel runs on the GPU: environment variable TD_INT8_KERNEL, read when a module's weight is
set or loaded on the GPU and when a module still holding tiles runs there.
- `rowcol` (the default): the per-channel layout of quant/rowcol_int8.py, a plain int8 GEMM with int32
  accumulation over the whole K (quant/rowcol_kernels.py) and activations quantized per token. A
  `TileInt8Linear` that meets it re-quantizes its weight once, on the device: the tiles are dequantized
  and each output channel is quantized again (`to_per_channel`). That rewrites `int8_weight` in place and
  replaces `scale` by one float32 per output channel, so the GPU holds one int8 copy, as before. Loading
  a state dict whose tensors land on the GPU does it at once; a float weight set on the GPU is quantized
  per channel directly (one rounding instead of two).
- `tile`: TurboDiffusion's own math, the Triton tile GEMM of quant/kernels.py, bit-faithful to the
  released scales.
Measured on an H100 (bench/results/dit_h100.json, kernels_h100.json): the 1.3B DiT forward at 480p with
sla took 235 ms with rowcol and 258 ms with tile, and the FFN-up linear 1.03 ms against 1.35 ms
(bf16: 1.35 ms); the re-quantization's second rounding moved the linear's error vs bf16 from 1.33e-2
to 1.48e-2 and the whole forward's error vs diffusers not at all (1.98e-2 and 1.99e-2).
The layout is a property of the buffers (`scale` 2-D: tiles; 1-D: per channel), so a module whose
tensors were swapped for copies taken earlier (residency.py moves experts that way) is re-quantized
again when it next runs. Once per channel, a module keeps that layout and runs the rowcol math whatever
TD_INT8_KERNEL says (the tile values are gone); on the CPU its reference is `w8a8_rowcol_reference`.
The state dict always has the checkpoint layout: a per-channel module writes its weight re-quantized
into 128x128 tiles (close to, not bit-equal with, the tiles it was loaded from).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from turbodiffusion_core.quant.base import QuantizedLinear, QuantizedRows

TILE = 128
INT8_QMAX = 128.0
"""Divisor of amax: TurboDiffusion scales to +-128 and lets +128 saturate to 127."""
AMAX_FLOOR = 1e-8
INT8_KERNEL_ENV = "TD_INT8_KERNEL"
INT8_KERNELS = ("rowcol", "tile")
DEFAULT_INT8_KERNEL = "rowcol"
"""The faster of the two on an H100 (module docstring)."""


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


def int8_kernel_choice() -> str:
    """TD_INT8_KERNEL: "rowcol" (default) or "tile" (see the module docstring)."""
    choice = os.environ.get(INT8_KERNEL_ENV, "").strip().lower() or DEFAULT_INT8_KERNEL
    if choice not in INT8_KERNELS:
        raise ValueError(f"{INT8_KERNEL_ENV}={choice!r}; choose one of {', '.join(INT8_KERNELS)}")
    return choice


class TileInt8Linear(QuantizedLinear):
    """Drop-in for nn.Linear holding TurboDiffusion's int8 tile-quantized weight (buffers, as in the files).
    On the GPU the rowcol or the tile kernel (TD_INT8_KERNEL, module docstring), elsewhere the reference
    of the layout the module holds."""

    def register_weight(self, device: Optional[torch.device | str]) -> None:
        shape = (self.out_features, self.in_features)
        self.register_buffer("int8_weight", torch.empty(shape, dtype=torch.int8, device=device))
        self._reset_tile_scale(device)

    def _reset_tile_scale(self, device: Optional[torch.device | str]) -> None:
        grid = _tile_grid(self.out_features, self.in_features)
        self.register_buffer("scale", torch.empty(grid, dtype=torch.float32, device=device))

    @property
    def per_channel(self) -> bool:
        """Whether the weight is held per output channel (rowcol) rather than in 128x128 tiles."""
        return self.scale.dim() == 1

    @property
    def takes_int8_rows(self) -> bool:
        """Per channel, the layer's GEMM takes rows quantized by the norm before it (`Int8Rows`)."""
        return self.per_channel

    def rows_forward(self, rows: QuantizedRows) -> torch.Tensor:
        """`Int8Rows` (a per-channel layer only): the rowcol GEMM on them as they are."""
        from turbodiffusion_core.kernels.triton_support import kernels_usable
        from turbodiffusion_core.quant.rowcol_int8 import Int8Rows, w8a8_rowcol_from_rows

        if not isinstance(rows, Int8Rows) or not self.per_channel:
            raise ValueError("pre-quantized int8 rows need a per-channel layer")
        data, row_scale = rows.data.reshape(-1, self.in_features), rows.scale.reshape(-1)
        if rows.data.is_cuda and kernels_usable(rows.data):
            from turbodiffusion_core.quant.rowcol_kernels import int8_rowcol_matmul

            out = int8_rowcol_matmul(data, row_scale, self.int8_weight, self.scale, self.bias, out_dtype=rows.dtype)
        else:  # the same product in PyTorch, from the rows as they are
            out = w8a8_rowcol_from_rows(data, row_scale, self.int8_weight, self.scale, self.bias, rows.dtype)
        return out.reshape(*rows.data.shape[:-1], self.out_features)

    @staticmethod
    def _rowcol_runs_on(tensor: torch.Tensor) -> bool:
        """Whether forward would run the rowcol kernel on this tensor's device (as `QuantizedLinear.forward`
        decides: CUDA with Triton)."""
        from turbodiffusion_core.kernels.triton_support import kernels_usable

        return tensor.is_cuda and kernels_usable(tensor) and int8_kernel_choice() == "rowcol"

    def set_weight(self, weight: torch.Tensor) -> None:
        from turbodiffusion_core.quant.rowcol_int8 import quantize_int8_rowwise

        if self._rowcol_runs_on(self.int8_weight):
            q, scale = quantize_int8_rowwise(weight)
            self.int8_weight.copy_(q)
            self._set_channel_scale(scale)
            return
        if self.per_channel:
            self._reset_tile_scale(self.scale.device)
        q, scale = quantize_tile_int8(weight)
        self.int8_weight.copy_(q)
        self.scale.copy_(scale)

    def _set_channel_scale(self, scale: torch.Tensor) -> None:
        with torch.inference_mode(False):  # a normal tensor: it outlives any inference_mode forward
            self.scale = scale.to(device=self.int8_weight.device, dtype=torch.float32).clone()

    @torch.no_grad()
    def to_per_channel(self) -> None:
        """Re-quantize the tile weight per output channel, in place (no-op if it already is)."""
        from turbodiffusion_core.quant.rowcol_int8 import channel_int8_from_tiles

        if self.per_channel:
            return
        q, scale = channel_int8_from_tiles(self.int8_weight, self.scale)
        if self.int8_weight.is_inference() and not torch.is_inference_mode_enabled():
            self.int8_weight = q  # an inference tensor can only be rewritten inside inference_mode
        else:
            self.int8_weight.copy_(q)  # in place: the storage may be a view into a residency buffer
        self._set_channel_scale(scale)

    def kernel_forward(self, x: torch.Tensor, act: Optional[str]) -> torch.Tensor:
        if not self.per_channel and int8_kernel_choice() == "rowcol":
            self.to_per_channel()
        if self.per_channel:
            from turbodiffusion_core.quant.rowcol_kernels import int8_rowcol_linear

            return int8_rowcol_linear(x, self.int8_weight, self.scale, self.bias, act=act)
        from turbodiffusion_core.quant.kernels import int8_tile_linear

        return int8_tile_linear(x, self.int8_weight, self.scale, self.bias, act=act)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            from turbodiffusion_core.quant.rowcol_int8 import w8a8_rowcol_reference

            return w8a8_rowcol_reference(x, self.int8_weight, self.scale, self.bias)
        return w8a8_tile_reference(x, self.int8_weight, self.scale, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        """Always the checkpoint layout: a per-channel weight is written re-quantized into tiles."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.per_channel:
            from turbodiffusion_core.quant.rowcol_int8 import dequantize_int8_rowwise

            with torch.no_grad():
                q, scale = quantize_tile_int8(dequantize_int8_rowwise(self.int8_weight, self.scale))
            destination[prefix + "int8_weight"] = q
            destination[prefix + "scale"] = scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Files hold tiles: take the tile layout back first; on the GPU with rowcol, convert after."""
        if self.per_channel:
            self._reset_tile_scale(self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.scale.dim() == 2 and self._rowcol_runs_on(self.int8_weight):
            self.to_per_channel()

    def extra_repr(self) -> str:
        layout = "per_channel" if self.per_channel else "tiles"
        return f"{super().extra_repr()}, layout={layout}"
