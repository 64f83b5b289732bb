"""The `sagesla` backend: SLA's formula with the sparse branch on SpargeAttn's quantized CUDA kernels.

TurboDiffusion's SageSLA (reference/turbodiffusion.md §3.5): the block map and the linear branch are SLA's;
the block-sparse softmax attention runs on `spas_sage_attn`'s kernels with INT8 q and k (one scale per
block, k mean-centred first) and V in FP8 e4m3 (one scale per channel) on Ada and Hopper, FP16 V on Ampere.
For q, k, v [B, L, H, D]:

1. `sla_prepare` (the sla backend's prep kernel) makes the block map at the kernel's block sizes: top-k key
   blocks per query block, sorted ascending, plus the linear branch's phi(K)^T V and sum phi(K) when the
   layer has a `proj_l`.
2. `spas_lut` turns that map into SpargeAttn's look-up table: per query block the first kept key block,
   then the gap to each next one (delta-encoded), padded to the number of key blocks, and a count of kept
   blocks. The kernels mask the sequence's partial last key block only in their last iteration, which is
   right because the indices are ascending.
3. `spas_sparse_branch` runs the kernel (softmax scale 1/sqrt(D), no causal mask, no PV-skip threshold) on
   int8 q, k (k mean-centred) and FP8 V (FP16 on Ampere). For the Hopper kernel they are quantized where
   they lie (attention/sage_inputs.py, k centred with the mean the block map already computed) and it runs
   in its token-major layout; the mma.sync kernels get [B, H, L, D] copies quantized by SpargeAttn's
   helpers. O_s as [B, L, H, D] (a view of [B, H, L, D] memory for the mma.sync kernels).
4. `sla_add_linear` (the sla kernel's own epilogue) adds proj_l(O_l) and writes [B, L, H, D].

Block sizes. SpargeAttn's kernels have fixed tiles, and a kept block must be exactly one tile: the Hopper
(sm90) wgmma kernel takes 64 queries x 128 keys, the mma.sync kernels 128 x 64, our `sla`'s block sizes.
Like TurboDiffusion, the backend uses the fastest kernel of the GPU, so on Hopper its block map is SLA's
formula at blkq 64 / blkk 128: its reference is `sla_reference(..., blkq=64, blkk=128)`, and it keeps
floor(topk x L/128) blocks of 128 keys (25 at 480p for topk 0.1, where sla keeps 51 of 64: the same
density, a coarser map). `sagesla_attention(..., blocks=(128, 64))` runs the fp8 mma.sync kernel instead
(it runs on Hopper too) and so uses exactly `sla`'s block map.

Needs a CUDA GPU of compute capability 8.0 or newer, head_dim 64 or 128, at least 128 tokens, and a
`spas_sage_attn` build that has the kernel (see `spas_import_error`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import nn

from turbodiffusion_core.attention.sage_inputs import V_PAD, V_SCALE_MAX
from turbodiffusion_core.attention.sla_triton import SLAPrep, sla_add_linear, sla_prepare

HEAD_DIMS = (64, 128)
MIN_TOKENS = 128
HOPPER_BLOCKS = (64, 128)
"""(query, key) tile of the sm90 wgmma kernel."""
MMA_BLOCKS = (128, 64)
"""(query, key) tile of the mma.sync kernels (sm80 fp16 PV, sm89+ fp8 PV)."""

_KERNEL_SM90 = "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90"
_KERNEL_FP8 = "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale"
_KERNEL_FP16 = "qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf"
_NHD = 0  # SpargeAttn's tensor_layout for [B, L, H, D] (token-major)
_HND = 1  # and for [B, H, L, D] (head-major)
_PER_BLOCK = 1  # its qk_quant_gran for one scale per block


@functools.cache
def _spas() -> tuple[Any, Any, Any]:
    """SpargeAttn's compiled kernels, its fused V ops and its q/k quantizer (imported once; the helpers are
    what tests compare attention/sage_inputs.py with)."""
    import spas_sage_attn._fused as fused
    import spas_sage_attn._qattn as qattn
    from spas_sage_attn.utils import get_vanilla_qk_quant

    return qattn, fused, get_vanilla_qk_quant


@functools.cache
def spas_import_error() -> Optional[str]:
    """None when spas_sage_attn's kernels import here, else why not (for the user-facing error)."""
    try:
        _spas()
    except Exception as exc:  # an ImportError, or a build that does not match this torch / GPU driver
        return f"{type(exc).__name__}: {exc}"
    return None


def native_blocks(device: torch.device) -> tuple[int, int]:
    """The (query, key) block sizes of the fastest SpargeAttn kernel on this GPU (module docstring)."""
    return HOPPER_BLOCKS if torch.cuda.get_device_capability(device) == (9, 0) else MMA_BLOCKS


def _kernel_for(device: torch.device, blocks: tuple[int, int]) -> tuple[str, bool]:
    """Name of the SpargeAttn function for these blocks on this GPU, and whether it takes FP8 V."""
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        raise ValueError(f"sagesla needs compute capability 8.0 or newer, this GPU has {capability}")
    if blocks == HOPPER_BLOCKS:
        if capability != (9, 0):
            raise ValueError(f"blocks {HOPPER_BLOCKS} need SpargeAttn's sm90 kernel; this GPU is sm{capability}")
        return _KERNEL_SM90, True
    if blocks != MMA_BLOCKS:
        raise ValueError(f"blocks {blocks} unsupported: SpargeAttn's kernels take {HOPPER_BLOCKS} or {MMA_BLOCKS}")
    if capability[0] == 8 and capability[1] < 9:
        return _KERNEL_FP16, False
    return _KERNEL_FP8, True


def spas_lut(lut: torch.Tensor, batch: int, heads: int, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our sorted kept-block indices [B*H, M, topk] -> SpargeAttn's (lut [B, H, M, K], valid [B, H, M]), int32.

    The kernels start at lut[0] and add lut[i] to reach the i-th kept block, for valid[...] blocks.
    """
    bh, num_query_blocks, topk = lut.shape
    lut = lut.to(torch.int32)
    deltas = torch.diff(lut, dim=-1, prepend=torch.zeros_like(lut[..., :1]))
    table = lut.new_zeros(bh, num_query_blocks, num_key_blocks)
    table[..., :topk] = deltas
    valid = torch.full((batch, heads, num_query_blocks), topk, dtype=torch.int32, device=lut.device)
    return table.view(batch, heads, num_query_blocks, num_key_blocks), valid


def spas_sparse_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    valid: torch.Tensor,
    blocks: tuple[int, int],
    k_mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """O_s on SpargeAttn's kernel: q, k, v [B, L, H, D] (fp16 / bf16), its lut / valid -> [B, L, H, D].

    `k_mean` [B*H, 1, D] (k's mean over the tokens, which the block map already has) smooths K before its
    int8 quantization on the Hopper kernel; computed here when not given.
    """
    qattn, _, _ = _spas()
    kernel_name, fp8_v = _kernel_for(q.device, blocks)
    kernel = getattr(qattn, kernel_name, None)
    if kernel is None:
        raise RuntimeError(f"this spas_sage_attn build has no {kernel_name}: rebuild it for this GPU's architecture")
    with torch.cuda.device(q.device):
        if kernel_name == _KERNEL_SM90:
            if k_mean is None:
                k_mean = k.float().mean(dim=1)
            return _sparse_token_major(kernel, q, k, v, lut, valid, blocks, k_mean)
        return _sparse_head_major(kernel, fp8_v, q, k, v, lut, valid, blocks).transpose(1, 2)


def _sparse_token_major(kernel: Any, q, k, v, lut, valid, blocks, k_mean) -> torch.Tensor:
    """The sm90 kernel in its token-major ("NHD") layout on what attention/sage_inputs.py makes from q, k, v
    where they lie: int8 q and k, e4m3 V transposed as the FP8 PV kernels read it. No [B, H, L, D] copies;
    measured on an H200: the whole sagesla op at 32,760 tokens and topk 0.10 in 1.66 ms."""
    from turbodiffusion_core.attention.sage_inputs import quantize_qk_int8, quantize_v_fp8

    blkq, blkk = blocks
    q_int8, q_scale = quantize_qk_int8(q, blkq)
    k_int8, k_scale = quantize_qk_int8(k, blkk, mean=k_mean)
    v_fp8, v_scale = quantize_v_fp8(v, V_SCALE_MAX)  # [B, H, D, Lp]; the kernel takes it as [B, D, H, Lp]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kernel(q_int8, k_int8, v_fp8.permute(0, 2, 1, 3), out, lut, valid, q_scale, k_scale, v_scale,
           _NHD, 0, _PER_BLOCK, 1.0 / math.sqrt(q.shape[-1]))  # layout, causal, quant granularity, softmax scale
    return out


def _sparse_head_major(kernel: Any, fp8_v: bool, q, k, v, lut, valid, blocks) -> torch.Tensor:
    """The mma.sync kernels (Ampere, Ada; `blocks=MMA_BLOCKS` on Hopper) on [B, H, L, D] copies quantized by
    SpargeAttn's own helpers (k centred with its own mean), as TurboDiffusion calls them: O_s as [B, H, L, D]."""
    _, fused, quantize_qk = _spas()
    blkq, blkk = blocks
    batch, length, heads, dim = q.shape
    qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    q_int8, q_scale, k_int8, k_scale = quantize_qk(qh, kh, kh.mean(dim=2, keepdim=True), blkq, blkk)
    out = torch.empty_like(qh)
    args = (_HND, 0, _PER_BLOCK, 1.0 / math.sqrt(dim))
    vh = v.transpose(1, 2)  # [B, H, L, D] view: the kernels read V through its strides
    if not fp8_v:
        kernel(q_int8, k_int8, vh.to(torch.float16), out, lut, valid, q_scale, k_scale, *args)
        return out
    padded = math.ceil(length / V_PAD) * V_PAD
    v_permuted = torch.empty(batch, heads, dim, padded, dtype=v.dtype, device=v.device)
    fused.transpose_pad_permute_cuda(vh, v_permuted, _HND)
    v_fp8 = torch.empty(v_permuted.shape, dtype=torch.float8_e4m3fn, device=v.device)
    v_scale = torch.empty(batch, heads, dim, dtype=torch.float32, device=v.device)
    fused.scale_fuse_quant_cuda(v_permuted, v_fp8, v_scale, length, V_SCALE_MAX, _HND)
    kernel(q_int8, k_int8, v_fp8, out, lut, valid, q_scale, k_scale, v_scale, *args)
    return out


def _check(q: torch.Tensor, blocks: tuple[int, int]) -> None:
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"sagesla takes [B, L, H, D] with head_dim in {HEAD_DIMS}, got {tuple(q.shape)}")
    if q.shape[1] < MIN_TOKENS:
        raise ValueError(f"sagesla needs at least {MIN_TOKENS} tokens (SpargeAttn's limit), got {q.shape[1]}")
    if blocks not in (HOPPER_BLOCKS, MMA_BLOCKS):
        raise ValueError(f"blocks {blocks} unsupported: SpargeAttn's kernels take {HOPPER_BLOCKS} or {MMA_BLOCKS}")


def sagesla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.1,
    blocks: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """SageSLA for q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype (module docstring).

    `blocks` = (query, key) block sizes, by default the GPU's fastest kernel's (`native_blocks`).
    `proj_l=None` means SLA's zero-initialised projection: the sparse branch alone (contiguous from the Hopper
    kernel, a [B, L, H, D] view of [B, H, L, D] memory from the others; `reshape` copies it). With proj_l
    the result is contiguous.
    """
    blocks = tuple(blocks) if blocks is not None else native_blocks(q.device)
    _check(q, blocks)
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # the kernels take 16-bit inputs (TurboDiffusion: bf16)
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    blkq, blkk = blocks
    prep: SLAPrep = sla_prepare(q, k, v, topk, with_linear=proj_l is not None, blkq=blkq, blkk=blkk)
    batch, length, heads, _ = q.shape
    lut, valid = spas_lut(prep.lut, batch, heads, math.ceil(length / blkk))
    sparse = spas_sparse_branch(q, k, v, lut, valid, blocks, k_mean=prep.k_mean)
    if proj_l is None:
        return sparse.to(dtype)
    return sla_add_linear(q, sparse, prep, proj_l.weight, proj_l.bias).to(dtype)


def sagesla_takes(q: torch.Tensor) -> bool:
    """Whether SpargeAttn's kernels take these queries ([B, L, H, D]): a CUDA GPU of compute capability
    8.0 or newer, head_dim 64 or 128, at least MIN_TOKENS tokens."""
    return (
        q.dim() == 4 and q.shape[-1] in HEAD_DIMS and q.shape[1] >= MIN_TOKENS
        and q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def sagesla_or_sla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.1,
) -> torch.Tensor:
    """`auto`'s backend where spas_sage_attn loads: sagesla for what its kernels take, else `sla`'s kernel
    (a small test model, an unusual head size), so asking for "auto" never fails on a shape."""
    if sagesla_takes(q):
        return sagesla_attention(q, k, v, proj_l=proj_l, topk=topk)
    from turbodiffusion_core.attention.sla_triton import sla_triton

    return sla_triton(q, k, v, proj_l=proj_l, topk=topk)


def sagesla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.1,
) -> torch.Tensor:
    """The `sagesla` attention backend (the common signature): `sagesla_attention` at the GPU's blocks."""
    return sagesla_attention(q, k, v, proj_l=proj_l, topk=topk)


__all__ = [
    "HOPPER_BLOCKS",
    "MMA_BLOCKS",
    "native_blocks",
    "sagesla",
    "sagesla_attention",
    "spas_import_error",
    "spas_lut",
    "spas_sparse_branch",
]
