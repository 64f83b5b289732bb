"""GPU fast paths of the quantized linears: Triton activation quantizers and the int8 tile GEMM.

FP8 (`Fp8Linear`'s weights: e4m3, one float32 scale per output channel):
    `quantize_rows_fp8` reads a bf16 activation (once, or twice in chunks for wide rows: autotuned) and
    writes e4m3 values plus one float32 scale per row (amax/448, the `quantize_fp8_rowwise` rule),
    optionally applying GELU(tanh) first so the FFN's down projection quantizes the up projection's
    output without a separate GELU pass. The GEMM is
    `torch._scaled_mm` with row-wise scales ([M, 1] x [1, N], CUTLASS on sm90), bias and bf16 output,
    by default with fast accumulation (`use_fast_accum`: the tensor cores' reduced-precision fp32
    accumulation; measured on an H100 at the FFN-up shape 1.64x bf16 against 1.40x exact, error vs the
    W8A8 reference 1.8e-3 against 1.7e-3). TD_FP8_EXACT_ACCUM=1 turns it off.
    Quantizing activations is what makes this W8A8; `Fp8Linear`'s PyTorch forward is weight-only, so the
    two differ by the activation rounding (about 2-3% relative on Gaussian data).

INT8 tile (TurboDiffusion `-quant` checkpoints: int8 weight + float32 scale per 128x128 tile):
    `quantize_tiles_int8` is `quantize_tile_int8` for activations (amax per 128x128 tile, floor 1e-8,
    x*128/amax rounded half-to-even, saturated to [-128, 127], scale amax/128), and `int8_tile_matmul`
    is `w8a8_tile_reference` as one Triton GEMM: per 128-wide K tile an int8 MMA with int32
    accumulation, then acc += float(int32) * sA[m_tile, k_tile] * sW[n_tile, k_tile] in float32; bias
    in the epilogue. Exact up to float32 summation order. The int32 -> float32 step runs once per K tile
    on every accumulator element, so it is done with an integer add and a float subtract
    (`_int32_to_float32`) instead of the slow convert instruction. An output tile must sit inside one
    128x128 scale tile, so BLOCK_M and BLOCK_N are at most 128 (a 128x256 tile would need two float32
    accumulators next to the int32 product: more registers than a thread has).
    The per-channel int8 layout (`rowcol`, quant/rowcol_int8.py) has its kernels in quant/rowcol_kernels.py.

The constants 448 (e4m3 max) and 128 (int8 tile divisor) are those of quant/fp8.py and
quant/tile_int8.py, written out because Triton kernels cannot read Python globals. e4m3 rounding is
the hardware's conversion on sm89+ GPUs and spelled out in float32 (`kernels.jit_math.round_to_e4m3`)
before the then exact cast under Triton's interpreter (the same rounding: to nearest, ties to even).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from turbodiffusion_core.kernels.jit_math import gelu_tanh, rint, round_to_e4m3
from turbodiffusion_core.kernels.triton_support import autotune
from turbodiffusion_core.quant.fp8 import AMAX_FLOOR as FP8_AMAX_FLOOR
from turbodiffusion_core.quant.tile_int8 import AMAX_FLOOR as INT8_AMAX_FLOOR
from turbodiffusion_core.quant.tile_int8 import TILE

FP8_EXACT_ACCUM_ENV = "TD_FP8_EXACT_ACCUM"
ACTIVATIONS = (None, "gelu_tanh")


@triton.jit
def _load_row_chunk(x_row, cols, mask, GELU: tl.constexpr):
    """A [ROWS, BLOCK_K] chunk of rows in float32, GELU(tanh) applied when asked (shared with rowcol_kernels)."""
    x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = gelu_tanh(x)
    return x


@triton.jit
def _e4m3_chunk(x, scale, NATIVE: tl.constexpr):
    """x / scale clamped to the e4m3 range and rounded to e4m3, to be stored as float8_e4m3fn. NATIVE
    (sm89+ GPUs) leaves the rounding to the hardware conversion (round to nearest even, one instruction per
    two values); otherwise it is spelled out in float32 (`round_to_e4m3`) and the cast is exact."""
    x = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    if NATIVE:
        return x
    return round_to_e4m3(x)


GELU_ARGMIN = -0.7517915
"""Where GELU(tanh) has its minimum (about -0.17): it falls before and rises after, and is positive and
rising above 0."""


@triton.jit
def _gelu_extremes_init(ROWS: tl.constexpr):
    """Start values of (max x, smallest x at or above GELU_ARGMIN, largest x at or below it), chosen so
    that their GELU adds nothing to the amax: 0, 0 and -1e4 (GELU(-1e4) is -0)."""
    return (tl.zeros([ROWS], tl.float32), tl.zeros([ROWS], tl.float32), tl.full([ROWS], -1.0e4, tl.float32))


@triton.jit
def _gelu_extremes(x, hi, above, below):
    """Fold a [ROWS, BLOCK_K] chunk of raw (pre-GELU) values into the three per-row extremes."""
    hi = tl.maximum(hi, tl.max(x, axis=1))
    above = tl.minimum(above, tl.min(tl.where(x >= -0.7517915, x, 0.0), axis=1))
    below = tl.maximum(below, tl.max(tl.where(x <= -0.7517915, x, -1.0e4), axis=1))
    return hi, above, below


@triton.jit
def _gelu_amax(hi, above, below):
    """max |GELU(x)| over a row from its extremes: GELU rises above its minimum, so the largest value is
    GELU(max x), and |GELU| of the negative values peaks at the minimum, so their largest is at the values
    nearest it from either side. Three GELUs per row instead of one per element in the amax pass."""
    return tl.maximum(tl.abs(gelu_tanh(hi)), tl.maximum(tl.abs(gelu_tanh(above)), tl.abs(gelu_tanh(below))))


FP8_ROWQUANT_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "ROWS": rows}, num_warps=w)
    for bk, rows, w in (
        (2048, 2, 4), (1024, 4, 4), (2048, 4, 8), (4096, 1, 8), (4096, 2, 8),
        # whole Wan rows up to 16384 in registers: one read, GELU computed once
        (8192, 1, 8), (16384, 1, 16), (16384, 1, 32),
    )
]


@autotune(configs=FP8_ROWQUANT_CONFIGS, key=["n_cols", "GELU"])
@triton.jit
def _fp8_rowquant_kernel(
    x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_q, amax_floor,
    GELU: tl.constexpr, NATIVE: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):
    """Grid cdiv(M, ROWS): ROWS rows per program -> e4m3 rows and float32 scales amax/448. Rows up to
    BLOCK_K wide are read once; wider ones in BLOCK_K chunks twice (amax, then quantize; mostly from L2).
    With GELU the chunked amax pass keeps three extremes of the raw values instead of computing GELU
    (`_gelu_amax`), so GELU runs once per element there too."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * stride_x
    q_row = q_ptr + rows64[:, None] * stride_q
    cols = tl.arange(0, BLOCK_K)
    if n_cols <= BLOCK_K:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = _load_row_chunk(x_row, cols, mask, GELU)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor) / 448.0
        tl.store(q_row + cols[None, :], _e4m3_chunk(x, scale, NATIVE).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if GELU:
            hi, above, below = _gelu_extremes_init(ROWS)
            for start in range(0, n_cols, BLOCK_K):
                mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
                raw = _load_row_chunk(x_row + start, cols, mask, False)
                hi, above, below = _gelu_extremes(raw, hi, above, below)
            amax = tl.maximum(_gelu_amax(hi, above, below), amax_floor)
        else:
            amax = tl.full([ROWS], amax_floor, tl.float32)
            for start in range(0, n_cols, BLOCK_K):
                mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
                amax = tl.maximum(amax, tl.max(tl.abs(_load_row_chunk(x_row + start, cols, mask, False)), axis=1))
        scale = amax / 448.0
        for start in range(0, n_cols, BLOCK_K):
            mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
            x = _load_row_chunk(x_row + start, cols, mask, GELU)
            tl.store(q_row + start + cols[None, :], _e4m3_chunk(x, scale, NATIVE).to(q_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def native_e4m3(device: torch.device) -> bool:
    """Whether e4m3 rounding can be left to the hardware conversion: sm89+ GPUs, not Triton's interpreter
    (whose float -> fp8 casts round some values wrongly)."""
    from turbodiffusion_core.kernels.triton_support import interpreting

    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def _int8_tilequant_kernel(
    x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_q, stride_s, amax_floor,
    TILE_SIZE: tl.constexpr, GELU: tl.constexpr,
):
    """Grid (row tiles, col tiles): one 128x128 tile -> int8 values and its float32 scale amax/128."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * TILE_SIZE + tl.arange(0, TILE_SIZE)
    cols = pid_c * TILE_SIZE + tl.arange(0, TILE_SIZE)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = gelu_tanh(x)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), amax_floor)
    q = rint(x * (128.0 / amax))
    q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)
    tl.store(q_ptr + rows64[:, None] * stride_q + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + pid_r * stride_s + pid_c, amax / 128.0)


@triton.jit
def _int32_to_float32(i):
    """float32(i) for |i| < 2^22 without the int->float convert instruction, which issues at a fraction of
    the float add rate and, run on every accumulator element after every K tile, can bound the tile GEMM:
    i + bits(1.5*2^23) is the bit pattern of the float 1.5*2^23 + i (one binade, ulp 1), so subtracting
    1.5*2^23 leaves exactly i. A 128-term int8 dot is at most 2^21 in magnitude."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles in a row share their weight
    column tiles while those are in L2. Shared by the int8 GEMMs (tile here, rowcol in rowcol_kernels.py)."""
    return _grouped_tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _grouped_tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number `tile` in grouped order (a persistent kernel's tiles)."""
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (tile % group) % group_rows, (tile % group) // group_rows


@triton.jit
def _load_k_step(a_ptrs, w_ptrs, k_start, offs_k, K, EVEN_K: tl.constexpr):
    """The A [BLOCK_M, BLOCK_K] and W^T [BLOCK_K, BLOCK_N] int8 tiles of one K step (zeros past K)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
    else:
        k_ok = k_start + offs_k < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
    return a, w


@triton.jit
def _store_tile(out, c_ptr, bias_ptr, offs_m, offs_n, safe_n, M, N, stride_cm, HAS_BIAS: tl.constexpr):
    """out (+ bias) -> C[offs_m, offs_n] in C's dtype, rows and columns past M, N masked."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


TILE_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": g}, num_warps=w, num_stages=s)
    for bm, bn, g, w, s in (
        (128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 64, 8, 4, 4), (64, 128, 8, 4, 4),
        # fewer stages (smaller shared memory: two or three CTAs per SM overlap one's MMA with another's
        # rescaling) and a wider group swizzle
        (64, 128, 8, 4, 3), (128, 64, 8, 4, 3), (128, 128, 16, 8, 3), (64, 128, 16, 4, 4),
    )
]


@autotune(configs=TILE_GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_tile_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_wn, stride_cm, stride_as, stride_ws,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, TILE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = sum_kt sA[m/128, kt] sW[n/128, kt] (qA[:, kt] . qW[:, kt]) (+ bias), grouped tile order."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_m = offs_m % M  # wrapped rows/cols compute garbage that the store masks out
    safe_n = offs_n % N
    offs_k = tl.arange(0, TILE_K)
    a_ptrs = a_ptr + safe_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + safe_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    # Output tiles never straddle a 128x128 scale tile (BLOCK_M, BLOCK_N divide TILE_K), so each K step
    # has one scalar scale per operand: a single multiply-add per accumulator element.
    tl.static_assert(TILE_K % BLOCK_M == 0 and TILE_K % BLOCK_N == 0)
    a_scale_ptr += (pid_m * BLOCK_M // TILE_K) * stride_as
    w_scale_ptr += (pid_n * BLOCK_N // TILE_K) * stride_ws

    tiles_k = tl.cdiv(K, TILE_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    scale = tl.load(a_scale_ptr) * tl.load(w_scale_ptr)
    for kt in tl.range(0, tiles_k):  # one 128-wide K tile per step; loads software-pipelined over num_stages
        a, w = _load_k_step(a_ptrs, w_ptrs, kt * TILE_K, offs_k, K, EVEN_K)
        # next step's scales now, so their latency hides under this step's MMA
        more = kt + 1 < tiles_k
        next_a_scale = tl.load(a_scale_ptr + kt + 1, mask=more, other=0.0)
        next_w_scale = tl.load(w_scale_ptr + kt + 1, mask=more, other=0.0)
        exact = tl.dot(a, w, out_dtype=tl.int32)
        acc += _int32_to_float32(exact) * scale
        scale = next_a_scale * next_w_scale
        a_ptrs += TILE_K
        w_ptrs += TILE_K

    _store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, safe_n, M, N, stride_cm, HAS_BIAS)


def fp8_fast_accum_default() -> bool:
    """Fast accumulation unless TD_FP8_EXACT_ACCUM is set to 1 / true / yes / on."""
    return os.environ.get(FP8_EXACT_ACCUM_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> 2-D [M, K] with a unit column stride (a view when possible)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _check_activation(act: Optional[str]) -> bool:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")
    return act == "gelu_tanh"


def quantize_rows_fp8(x: torch.Tensor, act: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]) with act(x) ~= q * scale, M = x.numel() / K.

    The autotuner picks per K between holding whole rows (one read) and chunks (two reads, the second
    mostly from L2); either way GELU is computed once per element.
    """
    gelu = _check_activation(act)
    flat = _flat_rows(x)
    rows, cols = flat.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]),)  # noqa: E731
    _fp8_rowquant_kernel[grid](flat, q, scale, rows, cols, flat.stride(0), q.stride(0), FP8_AMAX_FLOOR, GELU=gelu,
                               NATIVE=native_e4m3(x.device))
    return q, scale


def fp8_matmul(
    q_act: torch.Tensor,
    act_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    use_fast_accum: Optional[bool] = None,
) -> torch.Tensor:
    """(q_act * act_scale) @ (weight * weight_scale[:, None])^T + bias -> bfloat16 [..., N].

    q_act: float8_e4m3fn [..., K] (M rows in all) with one float32 scale per row, act_scale [M, 1] (from
    `quantize_rows_fp8`, or fused into `kernels.norm.residual_layernorm(out_dtype=torch.float8_e4m3fn)`);
    weight: float8_e4m3fn [N, K] (`Fp8Linear.weight`); weight_scale: float32 [N]. K and N must be
    multiples of 16. `use_fast_accum` lets the tensor cores accumulate in reduced precision (faster, less
    exact); None: `fp8_fast_accum_default()` (on unless TD_FP8_EXACT_ACCUM=1).
    """
    if use_fast_accum is None:
        use_fast_accum = fp8_fast_accum_default()
    out_features, in_features = weight.shape
    if q_act.shape[-1] != in_features:
        raise ValueError(f"activation has {q_act.shape[-1]} features, the weight takes {in_features}")
    out = torch._scaled_mm(
        _flat_rows(q_act),
        weight.t(),
        scale_a=act_scale.reshape(-1, 1),
        scale_b=weight_scale.float().reshape(1, out_features),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
        use_fast_accum=use_fast_accum,
    )
    return out.reshape(*q_act.shape[:-1], out_features)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    act: Optional[str] = None,
    use_fast_accum: Optional[bool] = None,
) -> torch.Tensor:
    """W8A8 FP8 linear of act(x) [..., K]: `quantize_rows_fp8` then `fp8_matmul` -> [..., N] in bfloat16."""
    q, scale = quantize_rows_fp8(x, act)
    out = fp8_matmul(q, scale, weight, weight_scale, bias, use_fast_accum=use_fast_accum)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantize_tiles_int8(x: torch.Tensor, act: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [M, K], float32 scale [ceil(M/128), ceil(K/128)]): `quantize_tile_int8` of act(x)."""
    gelu = _check_activation(act)
    flat = _flat_rows(x)
    rows, cols = flat.shape
    grid = (triton.cdiv(rows, TILE), triton.cdiv(cols, TILE))
    q = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    scale = torch.empty(grid, dtype=torch.float32, device=x.device)
    _int8_tilequant_kernel[grid](
        flat, q, scale, rows, cols, flat.stride(0), q.stride(0), scale.stride(0), INT8_AMAX_FLOOR,
        TILE_SIZE=TILE, GELU=gelu, num_warps=8,
    )
    return q, scale


def int8_tile_matmul(
    q_act: torch.Tensor,
    act_scale: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T with 128x128 tile scales ([ceil(M/128), ceil(K/128)], [ceil(N/128), ...])."""
    rows, inner = q_act.shape
    out_features = q_weight.shape[0]
    tiles_k = math.ceil(inner / TILE)
    if q_weight.shape[1] != inner or act_scale.shape[1] != tiles_k or weight_scale.shape[1] != tiles_k:
        raise ValueError("activation, weight and their tile scales disagree on K")
    q_act, q_weight = q_act.contiguous(), q_weight.contiguous()
    act_scale, weight_scale = act_scale.float().contiguous(), weight_scale.float().contiguous()
    out = torch.empty(rows, out_features, dtype=out_dtype, device=q_act.device)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)  # noqa: E731
    _int8_tile_gemm_kernel[grid](
        q_act, act_scale, q_weight, weight_scale, bias if bias is not None else act_scale, out,
        rows, out_features, inner,
        q_act.stride(0), q_weight.stride(0), out.stride(0), act_scale.stride(0), weight_scale.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=inner % TILE == 0, TILE_K=TILE,
    )
    return out


def int8_tile_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    act: Optional[str] = None,
) -> torch.Tensor:
    """`w8a8_tile_reference(act(x), ...)` on the GPU: tile-quantize x, int8 tile GEMM -> [..., N] in x's dtype."""
    q_act, act_scale = quantize_tiles_int8(x, act)
    out = int8_tile_matmul(q_act, act_scale, q_weight, weight_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], q_weight.shape[0])


__all__ = [
    "fp8_fast_accum_default",
    "fp8_linear",
    "fp8_matmul",
    "int8_tile_linear",
    "int8_tile_matmul",
    "quantize_rows_fp8",
    "quantize_tiles_int8",
]
