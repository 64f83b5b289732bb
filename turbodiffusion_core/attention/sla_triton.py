"""The `sla` backend on the GPU: SLA's main-branch formula as two Triton kernels.

Same inputs and same math as `sla_reference` (read its docstring for the formula); what differs is how
often memory is touched. For q, k, v [B, L, H, D] (bf16, after RoPE):

1. `_sla_prep_kernel` reads q, k and v once. It writes the sums of q over each query block and of k over
   each key block (float32, tiny), and per chunk of blocks the partial linear-attention state phi(K)^T V
   [D, D] and sum phi(K) [D] (phi = softmax over the head dim). Partials instead of atomics keep the result
   deterministic; `_sla_prep_finish_kernel` sums them (KV in v's dtype) and makes the pooled keys: block
   means of k minus k's mean over all tokens.
2. Block map: raw dot-product scores of query-block sums and pooled keys (torch.bmm, a few MB), then the
   `topk` key blocks per query block with indices ascending (`select_blocks`: a radix-select kernel, or
   torch.topk + sort). Sorting lets the attention kernel treat only the last kept block as possibly partial
   (only the sequence's last block can be), so no other iteration pays for tail masking.
3. `_sla_attn_kernel`, one program per (query tile, batch*head): online-softmax attention over the kept
   key blocks only (exp2 domain, scale 1/sqrt(D)), then in the epilogue the linear branch
   phi(q) KV / (1e-5 + phi(q).ksum), its `proj_l` (D x D + bias, shared by the heads), the sum of both
   branches, and one bf16 store in the [B, L, H, D] layout the o-projection reads as [B, L, H*D].

Inputs may be any [B, L, H, D] views whose head_dim is contiguous (the q/k/v projections' `view`).
Differences from the reference are rounding only: bf16 MMA operands (P, phi(q), phi(k), KV and the
linear output are rounded to bf16 before their matmuls, as TurboDiffusion's bf16 SLA does) and the
summation order of the pooled means, which can swap a key block whose score ties another's.

The sagesla backend (attention/sagesla.py) reuses steps 1-2 at SpargeAttn's block sizes (the prep kernel
walks grains of the smaller block size and stores a sum whenever a block of either size ends) and step 3's
epilogue alone (`sla_add_linear`, sharing `_linear_branch` with the attention kernel) around SpargeAttn's
sparse kernel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from turbodiffusion_core.attention.sla_reference import BLKK, BLKQ, LINEAR_EPS, sla_topk_count
from turbodiffusion_core.kernels.triton_support import autotune, kernels_usable, num_sms

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAP_BLOCK_SIZES = (32, 64, 128)
"""Query / key block sizes `sla_prepare` accepts (powers of two, so the smaller divides the larger)."""
PREP_PROGRAMS_PER_SM = 4
"""Prep-kernel programs per SM to aim for: enough in flight to saturate HBM, few partials to sum."""


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (4, 3), (8, 3))],
    key=["seq_len", "HEAD_DIM", "BLOCK_N", "RATIO_Q", "RATIO_K", "WITH_LINEAR"],
)
@triton.jit
def _sla_prep_kernel(
    q_ptr, k_ptr, v_ptr,
    qblk_ptr, kblk_ptr, kv_part_ptr, ks_part_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    seq_len, num_heads, num_grains, num_chunks, grains_per_chunk,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, RATIO_Q: tl.constexpr, RATIO_K: tl.constexpr,
    WITH_LINEAR: tl.constexpr,
):
    """Grid (num_chunks, B*H). Sums of q over each query block (RATIO_Q grains of BLOCK_N tokens) and of k over
    each key block (RATIO_K grains); linear-branch partials per chunk. Chunks hold whole blocks of both sizes."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    num_qblocks = tl.cdiv(num_grains, RATIO_Q)
    num_kblocks = tl.cdiv(num_grains, RATIO_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    kv = tl.zeros([HEAD_DIM, HEAD_DIM], dtype=tl.float32)
    ks = tl.zeros([HEAD_DIM], dtype=tl.float32)
    q_acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    k_acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(0, grains_per_chunk):
        grain = chunk * grains_per_chunk + j
        rows = grain * BLOCK_N + offs_n
        valid = rows < seq_len
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
        kf = k.to(tl.float32)
        q_acc += tl.sum(q.to(tl.float32), axis=0)
        k_acc += tl.sum(kf, axis=0)
        last = grain == num_grains - 1
        in_range = (offs_d * 0 + grain) < num_grains
        if (grain % RATIO_Q == RATIO_Q - 1) | last:  # a query block ends here
            tl.store(qblk_ptr + (bh * num_qblocks + grain // RATIO_Q) * HEAD_DIM + offs_d, q_acc, mask=in_range)
            q_acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        if (grain % RATIO_K == RATIO_K - 1) | last:  # a key block ends here
            tl.store(kblk_ptr + (bh * num_kblocks + grain // RATIO_K) * HEAD_DIM + offs_d, k_acc, mask=in_range)
            k_acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        if WITH_LINEAR:
            v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            e = tl.exp(kf - tl.max(kf, axis=1)[:, None])
            phi = e / tl.sum(e, axis=1)[:, None]
            phi = tl.where(valid[:, None], phi, 0.0)
            ks += tl.sum(phi, axis=0)
            kv = tl.dot(tl.trans(phi.to(v.dtype)), v, kv)
    if WITH_LINEAR:
        part = bh * num_chunks + chunk
        tl.store(kv_part_ptr + part * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :], kv)
        tl.store(ks_part_ptr + part * HEAD_DIM + offs_d, ks)


@triton.jit
def _sla_prep_finish_kernel(
    kblk_ptr, pooled_ptr, kmean_ptr, kv_part_ptr, ks_part_ptr, kv_ptr, ksum_ptr,
    seq_len, num_kblocks, num_chunks, blkk,
    HEAD_DIM: tl.constexpr, D_SLICE: tl.constexpr, BLOCK_NK: tl.constexpr, WITH_LINEAR: tl.constexpr,
):
    """Grid (HEAD_DIM // D_SLICE, B*H): for head dims [d0, d0 + D_SLICE) of one head row, k's mean over the
    tokens, the block map's pooled keys (block mean of k minus that mean), and the linear branch's KV rows and
    ksum summed over the prep kernel's chunks."""
    d0 = tl.program_id(0) * D_SLICE
    bh = tl.program_id(1)
    dims = d0 + tl.arange(0, D_SLICE)
    offs_j = tl.arange(0, BLOCK_NK)
    kblk_row = kblk_ptr + bh.to(tl.int64) * num_kblocks * HEAD_DIM
    total = tl.zeros([D_SLICE], dtype=tl.float32)
    for start in range(0, num_kblocks, BLOCK_NK):
        blocks = start + offs_j
        mask = (blocks < num_kblocks)[:, None]
        total += tl.sum(tl.load(kblk_row + blocks[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0), axis=0)
    mean = total / seq_len
    tl.store(kmean_ptr + bh * HEAD_DIM + dims, mean)
    pooled_row = pooled_ptr + bh.to(tl.int64) * num_kblocks * HEAD_DIM
    for start in range(0, num_kblocks, BLOCK_NK):
        blocks = start + offs_j
        mask = (blocks < num_kblocks)[:, None]
        sums = tl.load(kblk_row + blocks[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        count = tl.maximum(tl.minimum(seq_len - blocks * blkk, blkk), 1).to(tl.float32)  # tokens in it (the last: fewer)
        tl.store(pooled_row + blocks[:, None] * HEAD_DIM + dims[None, :], sums / count[:, None] - mean[None, :],
                 mask=mask)
    if WITH_LINEAR:
        offs_d = tl.arange(0, HEAD_DIM)
        kv = tl.zeros([D_SLICE, HEAD_DIM], dtype=tl.float32)
        ks = tl.zeros([D_SLICE], dtype=tl.float32)
        for c in range(0, num_chunks):
            part = bh * num_chunks + c
            kv += tl.load(kv_part_ptr + part * HEAD_DIM * HEAD_DIM + dims[:, None] * HEAD_DIM + offs_d[None, :])
            ks += tl.load(ks_part_ptr + part * HEAD_DIM + dims)
        tl.store(kv_ptr + bh * HEAD_DIM * HEAD_DIM + dims[:, None] * HEAD_DIM + offs_d[None, :],
                 kv.to(kv_ptr.dtype.element_ty))
        tl.store(ksum_ptr + bh * HEAD_DIM + dims, ks)


@triton.jit
def _linear_branch(q, bh, offs_d, kv_ptr, ksum_ptr, w_ptr, bias_ptr, linear_eps,
                   HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """proj_l(phi(q) KV / (eps + phi(q).ksum)) for a tile q [M, D] of head row `bh`; float32 [M, D]."""
    qf = q.to(tl.float32)
    e = tl.exp(qf - tl.max(qf, axis=1)[:, None])
    phi = e / tl.sum(e, axis=1)[:, None]
    kv = tl.load(kv_ptr + bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
    numer = tl.dot(phi.to(kv.dtype), kv)
    ksum = tl.load(ksum_ptr + bh * HEAD_DIM + offs_d)
    denom = tl.sum(phi * ksum[None, :], axis=1) + linear_eps
    linear = numer / denom[:, None]
    w_t = tl.load(w_ptr + offs_d[None, :] * HEAD_DIM + offs_d[:, None])  # proj_l.weight^T: [in, out]
    proj = tl.dot(linear.to(w_t.dtype), w_t)
    if HAS_BIAS:
        proj += tl.load(bias_ptr + offs_d)[None, :]
    return proj


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, qk_scale, key_ok, MASKED: tl.constexpr):
    """One online-softmax step of q [M, D] over a key block (k, v [N, D]); m_i in log2 units.

    The scale is applied inside the exponent's fused multiply-add (it is positive, so it commutes with max).
    """
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


ATTN_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "PAIRS": pairs}, num_warps=w, num_stages=s)
    for bm, pairs, w, s in (
        (128, False, 8, 3), (128, False, 8, 2), (64, False, 4, 3), (64, False, 4, 4),  # 128 rows on 4 warps spill
        # two kept key blocks per step: 128-key score tiles, the MMA shape Hopper runs best
        (128, True, 8, 3), (128, True, 8, 2), (64, True, 4, 3),
        # deeper pipelines: 4 stages took the H100's topk 0.10 kernel from 2.08 to 1.71 ms
        (128, True, 8, 4), (128, True, 8, 5), (128, False, 8, 4),
    )
]


@autotune(configs=ATTN_CONFIGS, key=["seq_len", "topk", "HEAD_DIM", "WITH_LINEAR"])
@triton.jit
def _sla_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lut_ptr,
    kv_ptr, ksum_ptr, w_ptr, bias_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    seq_len, num_heads, num_qblocks, topk, qk_scale, linear_eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLKQ: tl.constexpr,
    EVEN_L: tl.constexpr, WITH_LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), B*H). Sparse softmax branch + linear branch + proj_l, one store.

    PAIRS: attend to two kept key blocks per step (one [2*BLOCK_N, D] tile gathered from both), then to a
    leftover block on its own; the same sum in another order."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    lut_row = lut_ptr + (bh * num_qblocks + (pid_m * BLOCK_M) // BLKQ) * topk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The LUT is sorted, so only its last entry can be the sequence's partial last block.
    num_full = topk
    if not EVEN_L:
        num_full = topk - 1
    first_single = 0
    if PAIRS:
        offs_2n = tl.arange(0, 2 * BLOCK_N)
        second = offs_2n >= BLOCK_N
        local = offs_2n - tl.where(second, BLOCK_N, 0)
        for i in range(0, num_full // 2):
            start_a = tl.load(lut_row + 2 * i) * BLOCK_N
            start_b = tl.load(lut_row + 2 * i + 1) * BLOCK_N
            rows = tl.where(second, start_b, start_a) + local
            k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :])
            v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :])
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, qk_scale, offs_2n, False)
        first_single = num_full - num_full % 2
    for i in range(first_single, num_full):
        start = tl.load(lut_row + i) * BLOCK_N
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vl + offs_d[None, :])
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, qk_scale, offs_n, False)
    if not EVEN_L:
        start = tl.load(lut_row + topk - 1) * BLOCK_N
        key_ok = (start + offs_n) < seq_len
        k = tl.load(k_base + (start + offs_n)[:, None] * stride_kl + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_base + (start + offs_n)[:, None] * stride_vl + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, qk_scale, key_ok, True)
    out = acc / l_i[:, None]

    if WITH_LINEAR:
        out += _linear_branch(q, bh, offs_d, kv_ptr, ksum_ptr, w_ptr, bias_ptr, linear_eps, HEAD_DIM, HAS_BIAS)

    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@autotune(
    configs=[triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((128, 8), (64, 4))],
    key=["seq_len", "HEAD_DIM", "HAS_BIAS"],
)
@triton.jit
def _sla_linear_add_kernel(
    q_ptr, base_ptr, out_ptr, kv_ptr, ksum_ptr, w_ptr, bias_ptr,
    stride_qb, stride_ql, stride_qh,
    stride_sb, stride_sl, stride_sh,
    stride_ob, stride_ol, stride_oh,
    seq_len, num_heads, linear_eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), B*H). out = base + proj_l(linear branch of q): the sla epilogue on its own."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_len
    rows = offs_m[:, None]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows * stride_ql + offs_d[None, :], mask=row_ok, other=0.0)
    base = tl.load(base_ptr + b * stride_sb + h * stride_sh + rows * stride_sl + offs_d[None, :], mask=row_ok)
    out = base.to(tl.float32)
    out += _linear_branch(q, bh, offs_d, kv_ptr, ksum_ptr, w_ptr, bias_ptr, linear_eps, HEAD_DIM, HAS_BIAS)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sla_select_kernel(scores_ptr, lut_ptr, num_rows, num_kblocks, keep, ROWS: tl.constexpr, NK_PAD: tl.constexpr):
    """Grid cdiv(num_rows, ROWS). Per row of block scores: the indices of its `keep` largest, ascending.

    Scores map to unsigned keys in the same order (negative floats: all bits flipped; others: the sign bit
    set), and the keep-th largest key is found bit by bit from the top (a radix select: 32 rounds of one
    compare and one count per row, no sort). Every score above it is kept, and of those equal to it the first
    ones by index up to `keep` in all. Positions in the output row are a running count of the kept columns,
    so the indices come out sorted. Bit patterns decide ties: -0.0 ranks just below +0.0, and a NaN ranks by
    its bits (above +inf when its sign bit is clear, below -inf when set), where torch.topk ranks every NaN
    first; block-map scores are dot products of finite values, so neither occurs there."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    cols = tl.arange(0, NK_PAD)
    valid = row_ok[:, None] & (cols < num_kblocks)[None, :]
    s = tl.load(scores_ptr + rows.to(tl.int64)[:, None] * num_kblocks + cols[None, :], mask=valid, other=0.0)
    bits = s.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    key = tl.where(negative, ~bits, bits | 0x80000000)
    key = tl.where(valid, key, 0)  # below every real score's key (-inf maps to 0x007FFFFF)
    kth = tl.zeros([ROWS], dtype=tl.uint32)
    bit = tl.full([ROWS], 1, dtype=tl.uint32) << 31
    for _ in tl.static_range(32):
        candidate = kth | bit
        count = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
        kth = tl.where(count >= keep, candidate, kth)
        bit = bit >> 1
    above = key > kth[:, None]
    tie = (key == kth[:, None]) & valid
    room = keep - tl.sum(above.to(tl.int32), axis=1)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= room[:, None]))
    slot = tl.cumsum(take.to(tl.int32), axis=1) - 1
    index = tl.zeros([ROWS, NK_PAD], dtype=tl.int32) + cols[None, :]
    tl.store(lut_ptr + rows.to(tl.int64)[:, None] * keep + slot, index, mask=take & row_ok[:, None])


SELECT_ENV = "TD_SLA_SELECT"
DEFAULT_SELECT = "fused"
"""How `sla_prepare` picks the kept key blocks from the scores (TD_SLA_SELECT): "fused" (the default:
`_sla_select_kernel`, one radix-select kernel) or "torch" (torch.topk, then a sort: three kernels)."""


def select_blocks(scores: torch.Tensor, keep: int, method: Optional[str] = None) -> torch.Tensor:
    """Indices of the `keep` largest scores per row of [..., K] float scores, ascending, int32 [..., keep]."""
    method = method or os.environ.get(SELECT_ENV, DEFAULT_SELECT).strip().lower() or DEFAULT_SELECT
    if method not in ("torch", "fused"):
        raise ValueError(f"{SELECT_ENV}={method!r}: expected torch or fused")
    if method == "torch" or not kernels_usable(scores):
        return scores.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    num_kblocks = scores.shape[-1]
    flat = scores.reshape(-1, num_kblocks).float().contiguous()
    lut = torch.empty(flat.shape[0], keep, dtype=torch.int32, device=scores.device)
    nk_pad = triton.next_power_of_2(num_kblocks)
    rows = max(1, min(16, 2048 // nk_pad))
    _sla_select_kernel[(triton.cdiv(flat.shape[0], rows),)](flat, lut, flat.shape[0], num_kblocks, keep,
                                                            ROWS=rows, NK_PAD=nk_pad, num_warps=4)
    return lut.view(*scores.shape[:-1], keep)


@dataclass
class SLAPrep:
    """What the attention kernel needs besides q, k, v.

    lut: int32 [B*H, ceil(L/blkq), topk], kept key-block indices per query block, ascending.
    kv: [B*H, D, D] phi(K)^T V in v's dtype, ksum: float32 [B*H, D] sum of phi(K); None without proj_l.
    k_mean: float32 [B*H, 1, D], k's mean over the tokens (the block map's centring; sagesla's K smoothing).
    """

    lut: torch.Tensor
    kv: Optional[torch.Tensor]
    ksum: Optional[torch.Tensor]
    k_mean: Optional[torch.Tensor] = None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k, v must share one [B, L, H, D] shape, got {shapes}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}")


def _check_map_blocks(blkq: int, blkk: int) -> None:
    if blkq not in MAP_BLOCK_SIZES or blkk not in MAP_BLOCK_SIZES:
        raise ValueError(f"block sizes ({blkq}, {blkk}) unsupported: each must be one of {MAP_BLOCK_SIZES}")


def _check_attend_blocks(blkq: int, blkk: int) -> None:
    if blkq != 128 or blkk not in (32, 64, 128):
        raise ValueError(
            f"block sizes ({blkq}, {blkk}) unsupported by the sla kernel: blkq must be 128 (a multiple of every "
            "BLOCK_M), blkk 32, 64 or 128"
        )


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sla_prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float,
    *,
    with_linear: bool,
    blkq: int = BLKQ,
    blkk: int = BLKK,
) -> SLAPrep:
    """Block map (and, with `with_linear`, the linear branch's KV and ksum) for q, k, v [B, L, H, D].

    Any query / key block sizes of MAP_BLOCK_SIZES (the sla kernel itself takes blkq 128; the sagesla
    backend uses the block sizes of SpargeAttn's kernels). The prep kernel walks grains of the smaller block
    size and writes a query- or key-block sum whenever a block of that size ends; its chunks hold whole
    blocks of both sizes.
    """
    _check_inputs(q, k, v)
    _check_map_blocks(blkq, blkk)
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    bh = batch * heads
    grain = min(blkq, blkk)
    ratio_q, ratio_k = blkq // grain, blkk // grain
    whole = max(ratio_q, ratio_k)  # grains of the larger block: chunks hold whole blocks of both sizes
    ng = math.ceil(length / grain)
    nq, nk = math.ceil(length / blkq), math.ceil(length / blkk)
    chunks = min(math.ceil(ng / whole), max(1, PREP_PROGRAMS_PER_SM * num_sms(q.device) // bh))
    per_chunk = math.ceil(ng / (chunks * whole)) * whole
    chunks = math.ceil(ng / per_chunk)

    f32 = dict(device=q.device, dtype=torch.float32)
    q_blocks = torch.empty(bh, nq, dim, **f32)
    k_blocks = torch.empty(bh, nk, dim, **f32)
    if with_linear:
        kv_part = torch.empty(bh, chunks, dim, dim, **f32)
        ks_part = torch.empty(bh, chunks, dim, **f32)
        kv = torch.empty(bh, dim, dim, device=q.device, dtype=v.dtype)
        ksum = torch.empty(bh, dim, **f32)
    else:
        kv_part = ks_part = kv = ksum = q_blocks  # never touched: WITH_LINEAR is off
    _sla_prep_kernel[(chunks, bh)](
        q, k, v, q_blocks, k_blocks, kv_part, ks_part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        length, heads, ng, chunks, per_chunk,
        HEAD_DIM=dim, BLOCK_N=grain, RATIO_Q=ratio_q, RATIO_K=ratio_k, WITH_LINEAR=with_linear,
    )
    pooled_k = torch.empty(bh, nk, dim, **f32)  # block means of k minus k's mean over all tokens
    k_mean = torch.empty(bh, 1, dim, **f32)
    d_slice = min(16, dim)
    _sla_prep_finish_kernel[(dim // d_slice, bh)](
        k_blocks, pooled_k, k_mean, kv_part, ks_part, kv, ksum,
        length, nk, chunks, blkk,
        HEAD_DIM=dim, D_SLICE=d_slice, BLOCK_NK=64, WITH_LINEAR=with_linear, num_warps=4,
    )
    # Dividing a query block's row of scores by its (positive) token count would not change which key blocks
    # it keeps, so query blocks stay sums.
    scores = torch.bmm(q_blocks, pooled_k.transpose(1, 2))
    lut = select_blocks(scores, sla_topk_count(topk, nk))
    if not with_linear:
        return SLAPrep(lut=lut, kv=None, ksum=None, k_mean=k_mean)
    return SLAPrep(lut=lut, kv=kv, ksum=ksum, k_mean=k_mean)


def sla_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prep: SLAPrep,
    proj_weight: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    *,
    blkq: int = BLKQ,
    blkk: int = BLKK,
) -> torch.Tensor:
    """Sparse branch over `prep.lut` (+ linear branch through proj_weight/bias) -> [B, L, H, D] in q's dtype.

    `prep.lut` must be sorted ascending within each query block (as `sla_prepare` makes it).
    """
    _check_inputs(q, k, v)
    _check_attend_blocks(blkq, blkk)
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    bh = batch * heads
    nq = math.ceil(length / blkq)
    lut = prep.lut.to(torch.int32).contiguous()
    if lut.shape[:2] != (bh, nq):
        raise ValueError(f"lut has shape {tuple(lut.shape)}, expected ({bh}, {nq}, topk)")
    with_linear = proj_weight is not None
    if with_linear and (prep.kv is None or prep.ksum is None):
        raise ValueError("proj_weight given but the prep has no linear-branch state (with_linear=False)")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if with_linear:
        kv, ksum = prep.kv.contiguous(), prep.ksum.float().contiguous()
        weight = proj_weight.to(kv.dtype).contiguous()
        bias = proj_bias.float().contiguous() if proj_bias is not None else ksum
    else:
        kv = ksum = weight = bias = q  # never read: WITH_LINEAR is off
    topk = lut.shape[2]
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), bh)  # noqa: E731
    _sla_attn_kernel[grid](
        q, k, v, out, lut, kv, ksum, weight, bias,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        length, heads, nq, topk, LOG2E / math.sqrt(dim), LINEAR_EPS,
        HEAD_DIM=dim, BLOCK_N=blkk, BLKQ=blkq, EVEN_L=length % blkk == 0,
        WITH_LINEAR=with_linear, HAS_BIAS=with_linear and proj_bias is not None,
    )
    return out


def sla_add_linear(
    q: torch.Tensor,
    base: torch.Tensor,
    prep: SLAPrep,
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """base + proj_l(linear branch): the sla kernel's epilogue for a sparse branch computed elsewhere.

    q and base are [B, L, H, D] with a contiguous head_dim (base may be a transposed [B, H, L, D] tensor);
    `prep` must come from `sla_prepare(..., with_linear=True)` on the same q, k, v. Returns a contiguous
    [B, L, H, D] tensor in q's dtype; the sum is taken in float32 and rounded once.
    """
    if base.shape != q.shape:
        raise ValueError(f"base has shape {tuple(base.shape)}, expected {tuple(q.shape)}")
    if prep.kv is None or prep.ksum is None:
        raise ValueError("the prep has no linear-branch state (sla_prepare with with_linear=False)")
    q, base = _head_dim_contiguous(q), _head_dim_contiguous(base)
    batch, length, heads, dim = q.shape
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {dim} is not one of {SUPPORTED_HEAD_DIMS}")
    kv, ksum = prep.kv.contiguous(), prep.ksum.float().contiguous()
    weight = proj_weight.to(kv.dtype).contiguous()
    bias = proj_bias.float().contiguous() if proj_bias is not None else ksum
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _sla_linear_add_kernel[grid](
        q, base, out, kv, ksum, weight, bias,
        q.stride(0), q.stride(1), q.stride(2),
        base.stride(0), base.stride(1), base.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        length, heads, LINEAR_EPS,
        HEAD_DIM=dim, HAS_BIAS=proj_bias is not None,
    )
    return out


def sla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.1,
) -> torch.Tensor:
    """The `sla` attention backend: SLA self-attention for q, k, v [B, L, H, D] -> [B, L, H, D].

    Same contract as `sla_reference` (`proj_l=None` means SLA's zero-initialised projection, i.e. the
    sparse branch alone). The output is contiguous, so `.reshape(B, L, H * D)` is free.
    """
    prep = sla_prepare(q, k, v, topk, with_linear=proj_l is not None)
    if proj_l is None:
        return sla_attend(q, k, v, prep)
    return sla_attend(q, k, v, prep, proj_l.weight, proj_l.bias)


__all__ = ["SLAPrep", "sla_add_linear", "sla_attend", "sla_prepare", "sla_triton"]
