"""SpargeAttn's quantized kernel inputs, made straight from our [B, L, H, D] q, k, v (attention/sagesla.py).

SpargeAttn's own helpers want [B, H, L, D] memory: q and k are transposed and copied, k's mean is a third
pass, its Triton quantizer a fourth; V is transposed and padded by one CUDA kernel and scaled by another
that reads it twice. Its attention kernels, though, take any token and head strides (their "NHD"
layout), so these kernels read q, k, v where they are and write only what the kernel reads:

- `quantize_qk_int8(x, block, mean)`: int8 [B, L, H, D] with one float32 scale per (batch, head, block of
  `block` tokens): scale = amax / 127 over the block (after subtracting `mean` [B, H, D], SageAttention's
  smoothing of K, which leaves softmax unchanged), values x / scale rounded half to even. One read of x.
- `quantize_v_fp8(v)`: e4m3 V as the FP8 PV kernels read it: [B, H, D, Lp] (tokens last, zero-padded to a
  multiple of 128), tokens permuted within each group of 16 into the order of the FP8 MMA's operand
  fragments (token 8a + 2b + c sits at position 2a + 4b + c), scaled per channel so that the channel's
  amax over the sequence maps to 2.25 (SageAttention2++'s range); scale [B, H, D] = amax / 2.25.
  Two reads of v (a per-channel amax pass, then the transposing quantizer).

The references below spell the same results out in PyTorch; the tests compare the kernels with them
(under Triton's interpreter on the CPU) and, on a GPU with spas_sage_attn, with SpargeAttn's own helpers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from turbodiffusion_core.kernels.jit_math import rint, round_to_e4m3

V_SCALE_MAX = 2.25
"""FP8 V is scaled per channel to +-2.25 (SageAttention2++'s range, as TurboDiffusion calls it)."""
V_PAD = 128
PERMUTE_GROUP = 16
AMAX_FLOOR = 1e-8
_V_TOKENS = 64
"""Tokens per program of the V quantizer (a multiple of PERMUTE_GROUP that divides V_PAD)."""


@triton.jit
def _qk_int8_kernel(
    x_ptr, mean_ptr, q_ptr, s_ptr, length, heads, n_blocks,
    stride_b, stride_l, stride_h, amax_floor,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """Grid (blocks, B*H): one block of BLOCK tokens of one head -> int8 rows and one scale."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    tokens = blk * BLOCK + tl.arange(0, BLOCK)
    ok = tokens < length
    d = tl.arange(0, HEAD_DIM)
    x_ptrs = x_ptr + b.to(tl.int64) * stride_b + tokens.to(tl.int64)[:, None] * stride_l + h * stride_h + d[None, :]
    x = tl.load(x_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(ok[:, None], x - tl.load(mean_ptr + bh * HEAD_DIM + d)[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)  # [BLOCK] row maxima, then the block's
    amax = tl.max(amax, axis=0) + tl.zeros([BLOCK], tl.float32)  # broadcast back: div_rn takes tensors
    inv = tl.math.div_rn(tl.full([BLOCK], 127.0, tl.float32), amax)  # IEEE division, as PyTorch's 127 / amax
    q = rint(x * inv[:, None])
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
    out_rows = (b.to(tl.int64) * length + tokens) * heads + h
    tl.store(q_ptr + out_rows[:, None] * HEAD_DIM + d[None, :], q, mask=ok[:, None])
    tl.store(s_ptr + bh * n_blocks + blk, tl.max(amax, axis=0) / 127.0)


@triton.jit
def _v_amax_kernel(v_ptr, amax_ptr, length, heads, stride_b, stride_l, stride_h,
                   HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (chunks, B*H): per-channel amax of CHUNK tokens, folded into amax [B*H, D] (zero-initialised)."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    tokens = chunk * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, HEAD_DIM)
    v_ptrs = v_ptr + b.to(tl.int64) * stride_b + tokens.to(tl.int64)[:, None] * stride_l + h * stride_h + d[None, :]
    v = tl.load(v_ptrs, mask=(tokens < length)[:, None], other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr + bh * HEAD_DIM + d, tl.max(tl.abs(v), axis=0))


@triton.jit
def _v_fp8_kernel(v_ptr, amax_ptr, out_ptr, scale_ptr, length, padded, heads, stride_b, stride_l, stride_h,
                  amax_floor, scale_max, HEAD_DIM: tl.constexpr, TOKENS: tl.constexpr):
    """Grid (padded / TOKENS, B*H): output positions p of one token block hold token 8a+2b+c for
    p = 2a+4b+c (within each 16); written transposed, tokens contiguous, in e4m3."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    p = tl.arange(0, TOKENS)
    local = p % 16
    source = blk * TOKENS + (p - local) + 8 * ((local // 2) % 2) + 2 * (local // 4) + local % 2
    d = tl.arange(0, HEAD_DIM)
    v_ptrs = v_ptr + b.to(tl.int64) * stride_b + source.to(tl.int64)[:, None] * stride_l + h * stride_h + d[None, :]
    v = tl.load(v_ptrs, mask=(source < length)[:, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.load(amax_ptr + bh * HEAD_DIM + d), amax_floor)
    inv = tl.math.div_rn(tl.full([HEAD_DIM], scale_max, tl.float32), amax)
    q = round_to_e4m3(tl.minimum(tl.maximum(v * inv[None, :], -448.0), 448.0))
    out_ptrs = out_ptr + bh.to(tl.int64) * HEAD_DIM * padded + d[None, :] * padded + (blk * TOKENS + p)[:, None]
    tl.store(out_ptrs, q.to(out_ptr.dtype.element_ty))
    if blk == 0:
        tl.store(scale_ptr + bh * HEAD_DIM + d, amax / scale_max)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"expected [B, L, H, D] with a contiguous head dimension, got {tuple(x.shape)}")
    if x.shape[-1] not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {x.shape[-1]}")


def quantize_qk_int8(x: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (int8 [B, L, H, D] contiguous, float32 scale [B, H, ceil(L/block)]); `mean` [B, H, D]
    (or [B*H, 1, D]) is subtracted first (k's smoothing)."""
    _check(x)
    batch, length, heads, dim = x.shape
    n_blocks = math.ceil(length / block)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(batch, heads, n_blocks, dtype=torch.float32, device=x.device)
    mean_arg = mean.reshape(batch * heads, dim).float().contiguous() if mean is not None else scale
    _qk_int8_kernel[(n_blocks, batch * heads)](
        x, mean_arg, q, scale, length, heads, n_blocks, x.stride(0), x.stride(1), x.stride(2), AMAX_FLOOR,
        HEAD_DIM=dim, BLOCK=block, HAS_MEAN=mean is not None, num_warps=4 if block * dim <= 8192 else 8,
    )
    return q, scale


def quantize_v_fp8(v: torch.Tensor, scale_max: float = V_SCALE_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, L, H, D] -> (float8_e4m3fn [B, H, D, Lp] permuted as the module docstring says, float32 scale [B, H, D])."""
    _check(v)
    batch, length, heads, dim = v.shape
    padded = math.ceil(length / V_PAD) * V_PAD
    amax = torch.zeros(batch * heads, dim, dtype=torch.float32, device=v.device)
    chunk = 256
    strides = (v.stride(0), v.stride(1), v.stride(2))
    _v_amax_kernel[(math.ceil(length / chunk), batch * heads)](v, amax, length, heads, *strides, HEAD_DIM=dim,
                                                               CHUNK=chunk, num_warps=4)
    out = torch.empty(batch, heads, dim, padded, dtype=torch.float8_e4m3fn, device=v.device)
    scale = torch.empty(batch, heads, dim, dtype=torch.float32, device=v.device)
    _v_fp8_kernel[(padded // _V_TOKENS, batch * heads)](
        v, amax, out, scale, length, padded, heads, *strides, AMAX_FLOOR, scale_max,
        HEAD_DIM=dim, TOKENS=_V_TOKENS, num_warps=4,
    )
    return out, scale


# ------------------------------------------------------------------------------------------- references


def quantize_qk_int8_reference(x: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_qk_int8` in PyTorch."""
    batch, length, heads, dim = x.shape
    xf = x.float()
    if mean is not None:
        xf = xf - mean.reshape(batch, 1, heads, dim).float()
    n_blocks = math.ceil(length / block)
    padded = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, n_blocks * block - length))
    blocks = padded.view(batch, n_blocks, block, heads, dim)
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(AMAX_FLOOR)  # [B, nb, H]
    inv = torch.full_like(amax, 127.0) / amax  # IEEE division (a Python scalar over a tensor is 1/x times it)
    q = torch.round(blocks * inv[:, :, None, :, None]).clamp(-127, 127).to(torch.int8)
    return q.view(batch, n_blocks * block, heads, dim)[:, :length].contiguous(), (amax / 127.0).transpose(1, 2).contiguous()


def spas_token_order(padded: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """For each output position of the permuted V, the token it holds (see the module docstring)."""
    p = torch.arange(padded, device=device)
    local = p % PERMUTE_GROUP
    return (p - local) + 8 * ((local // 2) % 2) + 2 * (local // 4) + local % 2


def quantize_v_fp8_reference(v: torch.Tensor, scale_max: float = V_SCALE_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_v_fp8` in PyTorch."""
    batch, length, heads, dim = v.shape
    padded = math.ceil(length / V_PAD) * V_PAD
    vt = torch.nn.functional.pad(v.float().permute(0, 2, 3, 1), (0, padded - length))  # [B, H, D, Lp]
    amax = vt.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scaled = (vt * (torch.full_like(amax, scale_max) / amax)[..., None]).clamp(-448.0, 448.0)
    return scaled[..., spas_token_order(padded, v.device)].to(torch.float8_e4m3fn), amax / scale_max


__all__ = [
    "V_SCALE_MAX",
    "quantize_qk_int8",
    "quantize_qk_int8_reference",
    "quantize_v_fp8",
    "quantize_v_fp8_reference",
    "spas_token_order",
]
