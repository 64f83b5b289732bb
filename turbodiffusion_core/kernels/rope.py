"""q/k RMSNorm across heads and Wan's interleaved 3D RoPE, both q and k in one pass (and the RMSNorm
alone, for the cross-attention's q, which has no RoPE: `rms_norm_rows`).

The DiT's self-attention does, for q and for k (models/dit.py):

    q = apply_rope(norm_q(linear_q(x)).view(B, L, H, D), rotations)

RMSNorm over the full width C = H*D in float32, times the (float32) weight, rounded to the activation
dtype; then every interleaved channel pair (2i, 2i+1) of every head is rotated by the angle of its
token's (frame, height, width) position for pair i % (D/2). That is five PyTorch kernels per tensor with
float32 intermediates. `qk_norm_rope` reads each row of q and k once, keeps the same intermediate
rounding (so it matches the DiT's expressions to the last bit up to fused multiply-adds), and writes
the rotated rows in the input dtype; one program handles the same token of q and k, so the token's
rotation row (D/2 values shared by all heads) is read once for both.

The rotations are the DiT's `rope_tables`: unit complex64 numbers [L, 1, D/2] (cos + i sin); their
float32 view [L, D/2, 2] is what the kernel reads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(x_ptr, w_ptr, o_ptr, offs, mask, n_cols, eps, cos, sin):
    """RMSNorm one row held as [pairs, 2], round to the row's dtype, rotate each pair, store."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=None) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (xf * rstd * w).to(x.dtype).to(tl.float32)
    real, imag = tl.split(normed)
    rotated = tl.join(real * cos - imag * sin, real * sin + imag * cos)
    tl.store(o_ptr + offs, rotated.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, rot_ptr, qo_ptr, ko_ptr,
    n_pairs, seq_len, eps,
    stride_q, stride_k, stride_qo, stride_ko, stride_rot,
    HALF_HEAD: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (B*L,): token row `row` of q and of k."""
    row = tl.program_id(0).to(tl.int64)
    token = row % seq_len
    pairs = tl.arange(0, BLOCK_P)
    pair_ok = pairs < n_pairs
    offs = pairs[:, None] * 2 + tl.arange(0, 2)[None, :]
    n_cols = 2 * n_pairs
    mask = offs < n_cols
    freq = pairs % HALF_HEAD
    cos = tl.load(rot_ptr + token * stride_rot + 2 * freq, mask=pair_ok, other=1.0)
    sin = tl.load(rot_ptr + token * stride_rot + 2 * freq + 1, mask=pair_ok, other=0.0)
    _norm_rope_row(q_ptr + row * stride_q, wq_ptr, qo_ptr + row * stride_qo, offs, mask, n_cols, eps, cos, sin)
    _norm_rope_row(k_ptr + row * stride_k, wk_ptr, ko_ptr + row * stride_ko, offs, mask, n_cols, eps, cos, sin)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, n_cols, eps, stride_x, stride_o, BLOCK_C: tl.constexpr):
    """Grid (rows,): one row -> RMSNorm(row) * w, rounded to the output's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    xf = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (xf * rstd * w).to(o_ptr.dtype.element_ty), mask=mask)


def _token_rows(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    rows = x.reshape(batch * length, -1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _rotation_pairs(rotations: torch.Tensor, length: int, half: int) -> torch.Tensor:
    """complex [L, 1, D/2] (or float [L, D/2, 2]) -> contiguous float32 [L, D/2, 2] of (cos, sin)."""
    real = torch.view_as_real(rotations) if rotations.is_complex() else rotations
    if real.numel() != length * half * 2 or real.shape[-1] != 2:
        raise ValueError(f"rotations must hold [{length}, {half}] complex values, got {tuple(rotations.shape)}")
    return real.reshape(length, half, 2).float().contiguous()


def _heads_of(q: torch.Tensor, num_heads: Optional[int]) -> tuple[int, int, int, int]:
    if q.dim() == 4:
        batch, length, heads, head_dim = q.shape
        return batch, length, heads, head_dim
    if q.dim() == 3 and num_heads:
        batch, length, width = q.shape
        return batch, length, num_heads, width // num_heads
    raise ValueError("q must be [B, L, H, D], or [B, L, C] with num_heads given")


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rotations: torch.Tensor,
    *,
    num_heads: Optional[int] = None,
    eps: float = 1e-6,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(q) * q_weight and RMSNorm(k) * k_weight over the full width, then 3D RoPE, in one pass.

    Args:
        q, k: [B, L, H, D] or [B, L, C] (the q/k projections' outputs), same shape and dtype.
        q_weight, k_weight: RMSNorm weights [C].
        rotations: the token grid's unit complex rotations [L, 1, D/2] (`models.dit.rope_tables`).
        num_heads: H when q is [B, L, C] (D = C / H); read from the shape otherwise.
        inplace: write the results over q and k (each row is read whole before it is written).

    Returns:
        (q, k) rotated, shaped [B, L, H, D], in the input dtype.
    """
    if q.shape != k.shape:
        raise ValueError(f"q and k shapes differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    batch, length, heads, head_dim = _heads_of(q, num_heads)
    width = heads * head_dim
    rot = _rotation_pairs(rotations, length, head_dim // 2)
    q_rows, k_rows = _token_rows(q, batch, length), _token_rows(k, batch, length)
    if inplace and q_rows.data_ptr() == q.data_ptr() and k_rows.data_ptr() == k.data_ptr():
        q_out, k_out = q_rows, k_rows
    else:
        q_out, k_out = torch.empty_like(q_rows), torch.empty_like(k_rows)
    _qk_norm_rope_kernel[(batch * length,)](
        q_rows, k_rows, q_weight.contiguous(), k_weight.contiguous(), rot, q_out, k_out,
        width // 2, length, eps,
        q_rows.stride(0), k_rows.stride(0), q_out.stride(0), k_out.stride(0), rot.stride(0),
        HALF_HEAD=head_dim // 2, BLOCK_P=triton.next_power_of_2(width // 2), num_warps=4 if width <= 2048 else 8,
    )
    shape = (batch, length, heads, head_dim)
    return q_out.view(shape), k_out.view(shape)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, inplace: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension times `weight`, computed in float32 and returned in x's dtype: the
    DiT's `RMSNorm` (`F.rms_norm(x.float(), ...).to(x.dtype)`) as one pass instead of three PyTorch kernels
    with a float32 copy of x between them. x [..., C]; `inplace` writes over x when its rows allow it."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = rows if inplace and rows.data_ptr() == x.data_ptr() else torch.empty_like(rows)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight.contiguous(), out, width, eps, rows.stride(0), out.stride(0),
        BLOCK_C=block, num_warps=4 if block <= 2048 else 8,
    )
    return out.view(x.shape)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rotations: torch.Tensor,
    *,
    num_heads: Optional[int] = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused PyTorch version of `qk_norm_rope` (the DiT's RMSNorm then RoPE), same arguments and results."""
    batch, length, heads, head_dim = _heads_of(q, num_heads)
    rot = _rotation_pairs(rotations, length, head_dim // 2)
    cos, sin = rot[None, :, None, :, 0], rot[None, :, None, :, 1]

    def one(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(batch, length, -1).float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        pairs = normed.float().view(batch, length, heads, head_dim // 2, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "rms_norm_rows"]
