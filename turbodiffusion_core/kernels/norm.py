"""Gated residual add, LayerNorm and adaLN modulation fused into one pass over the residual stream.

A Wan block touches its float32 residual stream x [B, L, C] in three places (models/dit.py):

    h  = LN(x) * (1 + scale_sa) + shift_sa            -> bf16, into self-attention's q/k/v
    x  = x + gate_sa * y_sa;  h = LN_affine(x)         -> bf16, into cross-attention
    x  = x + y_ca;            h = LN(x) * (1 + scale_ff) + shift_ff   -> bf16, into the FFN
    x  = x + gate_ff * y_ff                            (then the next block's first line)

Unfused, each line is 4-8 PyTorch kernels, each reading and writing the whole float32 stream (about 200
MB at 480p for the 1.3B model). `residual_layernorm` does any such line as one row-wise kernel: read x
(and y), optionally write the new x, write h in bf16, or as float8 e4m3 plus a per-row scale (the input
format of `quant.kernels.fp8_matmul`), or as int8 plus a per-row scale (`quant.rowcol_int8`'s rule, the input
of `quant.rowcol_kernels.int8_rowcol_matmul`), all math in float32.

Modulation tensors (shift, scale, gate) are [B, 1, C] (Wan2.1 / Wan2.2 A14B: one timestep per sample)
or [B, L, C] (per-token), any strides with a contiguous last dim, e.g. slices of the [B, 6, C] table.
The PyTorch references below spell out the same math and are what the kernels are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from turbodiffusion_core.kernels.jit_math import rint, round_to_e4m3
from turbodiffusion_core.quant.fp8 import AMAX_FLOOR as FP8_AMAX_FLOOR
from turbodiffusion_core.quant.fp8 import quantize_fp8_rowwise
from turbodiffusion_core.quant.rowcol_int8 import AMAX_FLOOR as INT8_AMAX_FLOOR
from turbodiffusion_core.quant.rowcol_int8 import quantize_int8_rowwise

LN_EPS = 1e-6


@triton.jit
def _mod_row(ptr, b, l, stride_b, stride_l, cols, cmask):
    return tl.load(ptr + b * stride_b + l * stride_l + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _residual_norm_kernel(
    x_ptr, y_ptr, gate_ptr, x_out_ptr,
    w_ptr, b_ptr, shift_ptr, scale_ptr, h_ptr, h_scale_ptr,
    n_cols, seq_len, eps, amax_floor,
    stride_x, stride_y, stride_xo, stride_h,
    stride_gb, stride_gl, stride_shb, stride_shl, stride_scb, stride_scl,
    BLOCK_C: tl.constexpr, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr,
    AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr, FP8_OUT: tl.constexpr,
    INT8_OUT: tl.constexpr,
):
    """Grid (B*L,): one row. x' = x + gate*y; h = LN(x') [*w + b] [*(1 + scale) + shift]."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    l = row % seq_len
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + row * stride_y + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * _mod_row(gate_ptr, b, l, stride_gb, stride_gl, cols, cmask)
        x = x + y
        tl.store(x_out_ptr + row * stride_xo + cols, x, mask=cmask)
    if NORM:
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(cmask, x - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / n_cols
        h = centred * tl.math.rsqrt(var + eps)
        if AFFINE:
            h = h * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                h = h + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if MODULATE:
            scale = _mod_row(scale_ptr, b, l, stride_scb, stride_scl, cols, cmask)
            shift = _mod_row(shift_ptr, b, l, stride_shb, stride_shl, cols, cmask)
            h = h * (1.0 + scale) + shift
        if FP8_OUT:
            h = tl.where(cmask, h, 0.0)
            row_scale = tl.maximum(tl.max(tl.abs(h), axis=0), amax_floor) / 448.0
            h = round_to_e4m3(tl.minimum(tl.maximum(h / row_scale, -448.0), 448.0))
            tl.store(h_scale_ptr + row, row_scale)
        if INT8_OUT:  # quantize_int8_rowwise: x * (127/amax) rounded half-to-even, scale amax/127
            h = tl.where(cmask, h, 0.0)
            amax = tl.maximum(tl.max(tl.abs(h), axis=0), amax_floor)
            qmax = tl.full([], 127.0, tl.float32)
            h = tl.minimum(tl.maximum(rint(h * tl.math.div_rn(qmax, amax)), -127.0), 127.0)
            tl.store(h_scale_ptr + row, tl.math.div_rn(amax, qmax))
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, L, C] -> [B*L, C] view with a unit column stride (copies only if it must)."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _mod_strides(
    mod: Optional[torch.Tensor], batch: int, length: int, width: int
) -> tuple[Optional[torch.Tensor], int, int]:
    """Validate a modulation tensor ([B, 1, C] or [B, L, C]) and give its (tensor, batch, token) strides."""
    if mod is None:
        return None, 0, 0
    if mod.dim() != 3 or mod.shape[0] != batch or mod.shape[1] not in (1, length) or mod.shape[2] != width:
        raise ValueError(f"modulation of shape {tuple(mod.shape)} does not fit [{batch}, 1 or {length}, {width}]")
    if mod.stride(-1) != 1:
        mod = mod.contiguous()
    return mod, mod.stride(0), mod.stride(1) if mod.shape[1] == length and length > 1 else 0


def residual_layernorm(
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    norm: bool = True,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    eps: float = LN_EPS,
    out_dtype: torch.dtype = torch.bfloat16,
    inplace: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass of x' = x + gate * y and h = LayerNorm(x') [* weight + bias] [* (1 + scale) + shift].

    Args:
        x: float32 residual stream [B, L, C].
        y: branch output [B, L, C] (any float dtype) to add, or None for "normalise x only".
        gate: [B, 1 or L, C] multiplier of y (None: plain add).
        norm: compute h; False gives only the residual add.
        weight, bias: LayerNorm affine [C] (Wan's norm3), None for none.
        shift, scale: adaLN modulation [B, 1 or L, C], both or neither.
        out_dtype: dtype of h; torch.float8_e4m3fn also returns its per-row scale amax/448, torch.int8 its
            per-row scale amax/127 (`quantize_int8_rowwise`).
        inplace: write x' into x (when x is contiguous) instead of a new tensor.

    Returns:
        (x', h, h_scale): x' is x itself when y is None; h None when norm is False; h_scale [B*L, 1]
        float32 for float8 or int8 output, else None.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got {tuple(x.shape)}")
    if (shift is None) != (scale is None):
        raise ValueError("give shift and scale together")
    if y is None and (gate is not None or not norm):
        raise ValueError("gate needs y, and without y there is nothing to do but the norm")
    batch, length, width = x.shape
    x_rows = _rows(x)
    y_rows = _rows(y) if y is not None else x_rows
    gate, gsb, gsl = _mod_strides(gate, batch, length, width)
    shift, shb, shl = _mod_strides(shift, batch, length, width)
    scale, scb, scl = _mod_strides(scale, batch, length, width)
    if y is None:
        x_out, x_out_rows = x, x_rows  # not written
    else:
        x_out = x if inplace and x.is_contiguous() else torch.empty_like(x, memory_format=torch.contiguous_format)
        x_out_rows = x_out.view(-1, width)
    fp8, int8 = out_dtype == torch.float8_e4m3fn, out_dtype == torch.int8
    h = torch.empty(batch * length, width, dtype=out_dtype, device=x.device) if norm else None
    h_scale = torch.empty(batch * length, 1, dtype=torch.float32, device=x.device) if norm and (fp8 or int8) else None
    block_c = triton.next_power_of_2(width)
    placeholder = x_rows  # stands in for absent tensors; the constexpr flags keep it from being read
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    _residual_norm_kernel[(batch * length,)](
        x_rows, y_rows, gate if gate is not None else placeholder, x_out_rows,
        weight if weight is not None else placeholder, bias if bias is not None else placeholder,
        shift if shift is not None else placeholder, scale if scale is not None else placeholder,
        h if h is not None else placeholder, h_scale if h_scale is not None else placeholder,
        width, length, eps, INT8_AMAX_FLOOR if int8 else FP8_AMAX_FLOOR,
        x_rows.stride(0), y_rows.stride(0), x_out_rows.stride(0), width,
        gsb, gsl, shb, shl, scb, scl,
        BLOCK_C=block_c, HAS_Y=y is not None, HAS_GATE=gate is not None, NORM=norm,
        AFFINE=weight is not None, HAS_BIAS=bias is not None, MODULATE=shift is not None, FP8_OUT=fp8,
        INT8_OUT=int8, num_warps=4 if block_c <= 2048 else 8,
    )
    if h is not None:
        h = h.view(batch, length, width)
    return x_out, h, h_scale


def layernorm_modulate(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    *,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = LN_EPS,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """LayerNorm(x) [* weight + bias] [* (1 + scale) + shift] -> out_dtype (bf16 by default), one pass."""
    return residual_layernorm(x, weight=weight, bias=bias, shift=shift, scale=scale, eps=eps, out_dtype=out_dtype)[1]


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None, *, inplace: bool = False
) -> torch.Tensor:
    """x + gate * y in float32 (x float32 [B, L, C], y any float dtype), one pass."""
    return residual_layernorm(x, y, gate, norm=False, inplace=inplace)[0]


# ---------------------------------------------------------------------------------------------------------
# PyTorch references: the DiT's own unfused expressions (models/dit.py), the ground truth for the kernels.
# ---------------------------------------------------------------------------------------------------------


def residual_layernorm_reference(
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    norm: bool = True,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    eps: float = LN_EPS,
    out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Unfused PyTorch version of `residual_layernorm` (same arguments except `inplace`, same results)."""
    if y is not None:
        branch = y.float() if gate is None else y.float() * gate
        x = x + branch
    if not norm:
        return x, None, None
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    h = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    if shift is not None:
        h = h * (1 + scale) + shift
    if out_dtype == torch.int8:
        q, row_scale = quantize_int8_rowwise(h.reshape(-1, h.shape[-1]))
        return x, q.view(h.shape), row_scale[:, None]
    if out_dtype != torch.float8_e4m3fn:
        return x, h.to(out_dtype), None
    q, row_scale = quantize_fp8_rowwise(h.reshape(-1, h.shape[-1]))
    return x, q.view(h.shape), row_scale[:, None]


__all__ = [
    "LN_EPS",
    "gated_residual",
    "layernorm_modulate",
    "residual_layernorm",
    "residual_layernorm_reference",
]
