"""Pure-PyTorch reference of Sparse-Linear Attention as TurboDiffusion checkpoints were trained with it.

This is the SLA *main-branch* formula (reference/turbodiffusion.md §3.2), which is what every released
TurboDiffusion checkpoint expects:

1. Block map. Keys are mean-centred over the sequence (k - mean_L k, SageAttention's "smooth-k"), queries
   are mean-pooled over blocks of BLKQ tokens and centred keys over blocks of BLKK tokens (a partial tail
   block is averaged over its real length). Each query block scores every key block by the raw dot
   product of the pooled vectors and keeps its `topk = min(K, int(ratio * K))` best key blocks.
2. Sparse branch O_s: exact softmax attention (scale 1/sqrt(D)) of every query over the tokens of its
   query block's kept key blocks only.
3. Linear branch O_l over *all* keys with phi = softmax over the head dimension for q and k, no 1/sqrt(D):
   O_l = phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum_L phi(k)).
4. Output O_s + proj_l(O_l); proj_l is a per-layer Linear(D, D) shared by all heads.

One deliberate difference: when `int(ratio * K)` is 0 (short sequences, K < 1/ratio) SLA's kernel
attends to no key at all and returns NaN; we keep at least one key block, which leaves every realistic
shape (K = 512 blocks at 480p) unchanged and keeps the tiny models usable.

It is written to be checked, not to be fast, but it stays memory-frugal: the sparse branch walks the
query blocks in chunks and gathers only the kept key blocks, so a few thousand tokens run on a CPU and
the 480p shapes fit a GPU. Everything is computed in float32; the result has the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BLKQ = 128
"""Query block size TurboDiffusion's inference uses for `sla` (modify_model.replace_attention)."""
BLKK = 64
"""Key block size."""
LINEAR_EPS = 1e-5
"""Denominator epsilon of the linear branch."""

_CHUNK_BYTES = 256 * 2**20
"""Working-set budget of one chunk of query blocks in the sparse branch."""


def sla_topk_count(topk_ratio: float, num_key_blocks: int) -> int:
    """How many key blocks each query block keeps: min(K, int(ratio * K)), at least 1 (module docstring)."""
    return max(1, min(num_key_blocks, int(topk_ratio * num_key_blocks)))


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of x [B, H, L, D] over consecutive blocks of `block` tokens -> [B, H, ceil(L/block), D]."""
    length = x.shape[2]
    nblocks = math.ceil(length / block)
    padded = F.pad(x, (0, 0, 0, nblocks * block - length))
    sums = padded.unflatten(2, (nblocks, block)).sum(dim=3)
    counts = torch.clamp(length - torch.arange(nblocks, device=x.device) * block, max=block)
    return sums / counts.to(x.dtype)[:, None]


def sla_block_map(
    q: torch.Tensor, k: torch.Tensor, topk_ratio: float, blkq: int = BLKQ, blkk: int = BLKK
) -> torch.Tensor:
    """Kept key blocks of every query block: q, k [B, H, L, D] -> indices [B, H, ceil(L/blkq), topk].

    The order of the indices within a query block is unspecified (as with SLA's unsorted top-k).
    """
    qf, kf = q.float(), k.float()
    pooled_q = _block_mean(qf, blkq)
    pooled_k = _block_mean(kf - kf.mean(dim=2, keepdim=True), blkk)
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    topk = sla_topk_count(topk_ratio, scores.shape[-1])
    return scores.topk(topk, dim=-1, sorted=False).indices


def sla_sparse_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, blkq: int = BLKQ, blkk: int = BLKK
) -> torch.Tensor:
    """Block-sparse softmax attention O_s. q, k, v [B, H, L, D]; lut [B, H, M, topk] -> [B, H, L, D] fp32."""
    batch, heads, length, dim = q.shape
    nq, nk, topk = lut.shape[2], math.ceil(length / blkk), lut.shape[3]
    bh = batch * heads
    scale = 1.0 / math.sqrt(dim)

    def blocks(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
        x = F.pad(x.float().reshape(bh, length, dim), (0, 0, 0, count * size - length))
        return x.view(bh, count, size, dim)

    q_blocks = blocks(q, blkq, nq)
    k_blocks, v_blocks = blocks(k, blkk, nk), blocks(v, blkk, nk)
    key_valid = (torch.arange(nk * blkk, device=q.device) < length).view(nk, blkk)
    lut = lut.reshape(bh, nq, topk)
    rows = torch.arange(bh, device=q.device)[:, None, None]

    per_block_bytes = 4 * bh * (2 * topk * blkk * dim + 2 * blkq * topk * blkk + 2 * blkq * dim)
    chunk = max(1, _CHUNK_BYTES // per_block_bytes)
    out = torch.empty_like(q_blocks)
    for start in range(0, nq, chunk):
        idx = lut[:, start : start + chunk]  # [BH, c, topk]
        c = idx.shape[1]
        keys = k_blocks[rows, idx].reshape(bh, c, topk * blkk, dim)
        values = v_blocks[rows, idx].reshape(bh, c, topk * blkk, dim)
        scores = (q_blocks[:, start : start + c] @ keys.transpose(-1, -2)) * scale  # [BH, c, blkq, topk*blkk]
        valid = key_valid[idx].reshape(bh, c, 1, topk * blkk)
        probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        out[:, start : start + c] = probs @ values
    return out.view(bh, nq * blkq, dim)[:, :length].reshape(batch, heads, length, dim)


def sla_linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear attention over all keys, O_l = phi(q)(phi(k)^T v) / (eps + phi(q).sum phi(k)), fp32 [B, H, L, D]."""
    phi_q = q.float().softmax(dim=-1)
    phi_k = k.float().softmax(dim=-1)
    kv = phi_k.transpose(-1, -2) @ v.float()  # [B, H, D, D]
    k_sum = phi_k.sum(dim=2, keepdim=True)  # [B, H, 1, D]
    return (phi_q @ kv) / (LINEAR_EPS + (phi_q * k_sum).sum(dim=-1, keepdim=True))


def sla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.1,
    blkq: int = BLKQ,
    blkk: int = BLKK,
) -> torch.Tensor:
    """SLA self-attention for q, k, v [B, L, H, D] -> [B, L, H, D] (input dtype).

    `proj_l=None` means a zero projection (how SLA initialises it), so only the sparse branch remains:
    that is what running an official Wan checkpoint, which has no proj_l, with SLA gives.
    """
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    lut = sla_block_map(qh, kh, topk, blkq, blkk)
    out = sla_sparse_branch(qh, kh, vh, lut, blkq, blkk)
    if proj_l is not None:
        linear = sla_linear_branch(qh, kh, vh)
        bias = None if proj_l.bias is None else proj_l.bias.float()
        out = out + F.linear(linear, proj_l.weight.float(), bias)
    return out.transpose(1, 2).to(q.dtype)
