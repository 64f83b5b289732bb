"""GPU path of the per-channel ("rowcol") int8 linear: a Triton row quantizer and an int8 GEMM.

`quantize_rows_int8` is `rowcol_int8.quantize_int8_rowwise` for activations [..., K]: one float32 scale per
row (amax/127, floor 1e-8), x*127/amax rounded half-to-even and clamped to [-127, 127], with GELU(tanh)
optionally applied first (the FFN down projection quantizes the up projection's output without a
separate GELU pass). Rows up to BLOCK_K wide are read once; wider rows are read twice in BLOCK_K chunks
(amax, then quantize; the second read mostly hits L2), GELU computed in the second pass only (the amax
of GELU comes from three extremes of the raw values, `quant.kernels._gelu_amax`). The autotuner picks
the chunking per K.

`int8_rowcol_matmul` is `rowcol_int8.w8a8_rowcol_reference` after the quantization: one int32 `tl.dot`
chain over the whole K (the tensor cores accumulate, nothing is converted inside the loop), then the
epilogue float32(acc) * sA[m] * sW[n] + bias -> output dtype. Under Triton's interpreter both kernels
equal the reference bit for bit; on the GPU the compiler may fuse a multiply and an add into one FMA
(one rounding instead of two), which can move a quantizer rounding tie or an output's last float32 bit.

Tiles are Hopper-sized (128x128 to 128x256, 8 warps, 3-4 stages, grouped tile order); both operands
are read K-contiguous, the layout int8 wgmma needs. Triton keeps a wgmma asynchronous across loop
iterations only for float32 accumulators, so an int32 one waits for its MMA at every K step;
configurations small enough for two CTAs per SM let one CTA's MMA run while the other waits, and long
K steps (128-256) make the waits rarer. The autotuner chooses per (M, N, K).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4); without them only the pointer GEMM exists
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from turbodiffusion_core.kernels.jit_math import rint
from turbodiffusion_core.kernels.triton_support import autotune, num_sms
from turbodiffusion_core.quant import wgmma_int8
from turbodiffusion_core.quant.kernels import (_check_activation, _flat_rows, _gelu_amax, _gelu_extremes,
                                                _gelu_extremes_init, _grouped_tile, _grouped_tile_of, _load_k_step,
                                                _load_row_chunk, _store_tile)
from turbodiffusion_core.quant.rowcol_int8 import AMAX_FLOOR, MAX_K


@triton.jit
def _quantize_chunk(x, inv):
    """x * (127/amax) rounded half-to-even, clamped to [-127, 127], as int8."""
    q = rint(x * inv[:, None])
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


ROWQUANT_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "ROWS": rows}, num_warps=w)
    for bk, rows, w in ((2048, 2, 4), (1024, 4, 4), (2048, 4, 8), (4096, 1, 8), (16384, 1, 16), (2048, 8, 8),
                        (2048, 4, 4))
]


@autotune(configs=ROWQUANT_CONFIGS, key=["n_cols", "GELU"])
@triton.jit
def _int8_rowquant_kernel(
    x_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_q, amax_floor,
    GELU: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):
    """Grid cdiv(M, ROWS): ROWS rows per program -> int8 rows and float32 scales amax/127."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * stride_x
    q_row = q_ptr + rows64[:, None] * stride_q
    cols = tl.arange(0, BLOCK_K)
    qmax = tl.full([ROWS], 127.0, tl.float32)
    if n_cols <= BLOCK_K:  # the whole row in registers: one read
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = _load_row_chunk(x_row, cols, mask, GELU)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
        tl.store(q_row + cols[None, :], _quantize_chunk(x, tl.math.div_rn(qmax, amax)), mask=mask)
    else:  # amax over the chunks (GELU's from three extremes of the raw values), then quantize them (from L2)
        if GELU:
            hi, above, below = _gelu_extremes_init(ROWS)
            for start in range(0, n_cols, BLOCK_K):
                mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
                hi, above, below = _gelu_extremes(_load_row_chunk(x_row + start, cols, mask, False), hi, above, below)
            amax = tl.maximum(_gelu_amax(hi, above, below), amax_floor)
        else:
            amax = tl.full([ROWS], amax_floor, tl.float32)
            for start in range(0, n_cols, BLOCK_K):
                mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
                x = _load_row_chunk(x_row + start, cols, mask, False)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        inv = tl.math.div_rn(qmax, amax)
        for start in range(0, n_cols, BLOCK_K):
            mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
            x = _load_row_chunk(x_row + start, cols, mask, GELU)
            tl.store(q_row + start + cols[None, :], _quantize_chunk(x, inv), mask=mask)
    tl.store(scale_ptr + rows, tl.math.div_rn(amax, qmax), mask=row_ok)


GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        # two CTAs per SM (<= 113 KB shared memory, <= 128 registers a thread): see the module docstring
        (128, 128, 128, 8, 3),
        (128, 128, 64, 8, 4),
        (64, 128, 128, 4, 4),
        # one CTA per SM, bigger tiles or longer K steps
        (128, 128, 128, 8, 4),
        (128, 256, 128, 8, 3),
        (128, 256, 128, 8, 4),
        (256, 128, 128, 8, 3),
        (128, 256, 64, 8, 4),
        (128, 128, 256, 8, 3),
        (128, 128, 64, 4, 4),
        # the fastest at the FFN shapes in bench/sweep_int8_gemm.py (H200, 2026-12-06): 4 warps on a 128x128 tile
        (128, 128, 128, 4, 3),
        (128, 128, 64, 4, 5),
    )
]


@autotune(configs=GEMM_CONFIGS, key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_rowcol_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = float(qA . qW^T) * sA[:, None] * sW[None, :] (+ bias), int32 accumulation, grouped order."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_m = offs_m % M  # wrapped rows/cols compute garbage that the store masks out
    safe_n = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + safe_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + safe_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for kt in tl.range(0, tl.cdiv(K, BLOCK_K)):  # software-pipelined over num_stages
        a, w = _load_k_step(a_ptrs, w_ptrs, kt * BLOCK_K, offs_k, K, EVEN_K)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + safe_m)
    w_scale = tl.load(w_scale_ptr + safe_n)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    _store_tile(out, c_ptr, bias_ptr, offs_m, offs_n, safe_n, M, N, stride_cm, HAS_BIAS)


def _tma_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow the configuration being launched."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["c_desc"].block_shape = [bm, bn]


TMA_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PROGRAMS_PER_SM": p},
                  num_warps=w, num_stages=s, pre_hook=_tma_block_shapes)
    for bm, bn, bk, w, s, p in (
        (128, 128, 128, 8, 3, 1), (128, 128, 128, 4, 3, 1), (128, 128, 64, 4, 5, 1), (128, 128, 128, 8, 4, 1),
        (128, 256, 128, 8, 3, 1), (256, 128, 128, 8, 3, 1), (128, 256, 64, 8, 4, 1), (128, 128, 256, 8, 3, 1),
        # persistent with two programs an SM (tiles small enough for two): one's MMA waits overlap the other's
        (128, 128, 128, 4, 3, 2), (128, 128, 128, 8, 3, 2), (128, 128, 64, 4, 4, 2),
    )
]


@triton.jit
def _tma_gemm_tile(
    tile, a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, c_desc, M, N, K, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile of the TMA GEMM: the same sums and epilogue as `_int8_rowcol_gemm_kernel`."""
    pid_m, pid_n = _grouped_tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for kt in tl.range(0, tl.cdiv(K, BLOCK_K)):  # past K (and past M, N) the descriptors read zeros
        a = a_desc.load([off_m, kt * BLOCK_K])
        w = w_desc.load([off_n, kt * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_desc.store([off_m, off_n], out.to(c_desc.dtype))  # rows and columns past M, N are not written


@autotune(configs=TMA_GEMM_CONFIGS, key=["M", "N", "K", "PERSISTENT"])
@triton.jit
def _int8_rowcol_gemm_tma_kernel(
    a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, c_desc,
    M, N, K,
    HAS_BIAS: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
):
    """`_int8_rowcol_gemm_kernel` with operands and output moved by TMA (Hopper's tensor memory accelerator):
    one program per output tile, or with PERSISTENT (SMs x PROGRAMS_PER_SM) programs walking the tiles
    (grid-stride, grouped order) so that one tile's epilogue overlaps the next tile's first loads."""
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            _tma_gemm_tile(tile, a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, c_desc, M, N, K, HAS_BIAS,
                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _tma_gemm_tile(tl.program_id(0), a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, c_desc, M, N, K,
                       HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


GEMM_KERNELS = ("pointer", "tma", "tma-persistent", "wgmma")
GEMM_KERNEL_ENV = "TD_INT8_GEMM"
DEFAULT_GEMM_KERNEL = "wgmma"
"""Which int8 GEMM `int8_rowcol_matmul` runs (TD_INT8_GEMM): "wgmma" (the default: quant/wgmma_int8.py, Gluon with
asynchronous int32 wgmma; Hopper only, elsewhere "tma-persistent" runs), "tma-persistent" or "tma" (Triton with
TMA descriptors; Hopper and newer, elsewhere the pointer kernel runs), "pointer" (pointer loads, any CUDA GPU).
H100, FFN up 32760x1536x8960, GEMM alone: 0.98 / 0.85 / 0.87 ms (pointer / tma / tma-persistent,
bench/results/int8_gemm_kernels_h100.json) and 0.78-0.84 ms for wgmma against 0.89 for tma-persistent in five
later calls (int8_gemm_wgmma_h100*.json); 0.67-0.80 ms with its warp-specialized kernel and prefetched scales
(int8_gemm_ws_h100*.json); bf16 F.linear 1.16-1.30 ms."""


def default_gemm_kernel() -> str:
    name = os.environ.get(GEMM_KERNEL_ENV, DEFAULT_GEMM_KERNEL).strip().lower() or DEFAULT_GEMM_KERNEL
    if name not in GEMM_KERNELS:
        raise ValueError(f"{GEMM_KERNEL_ENV}={name!r}: expected one of {', '.join(GEMM_KERNELS)}")
    return name


@functools.lru_cache(maxsize=8)
def _tma_capable(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if device.type == "cpu":  # the interpreter emulates descriptors
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_usable(q_act: torch.Tensor, q_weight: torch.Tensor, out: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides."""
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (q_act, q_weight, out))
    return aligned and _tma_capable(q_act.device)


def _launch_tma_gemm(q_act, act_scale, q_weight, weight_scale, bias, out, persistent: bool) -> None:
    rows, inner = q_act.shape
    out_features = q_weight.shape[0]
    # placeholder block shapes: the autotuner's pre-hook sets each configuration's
    a_desc = TensorDescriptor.from_tensor(q_act, [128, 128])
    w_desc = TensorDescriptor.from_tensor(q_weight, [128, 128])
    c_desc = TensorDescriptor.from_tensor(out, [128, 128])
    sms = num_sms(q_act.device)

    def grid(meta):
        tiles = triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"])
        return (min(tiles, sms * meta["PROGRAMS_PER_SM"]) if persistent else tiles,)

    _int8_rowcol_gemm_tma_kernel[grid](
        a_desc, act_scale, w_desc, weight_scale, bias if bias is not None else act_scale, c_desc,
        rows, out_features, inner,
        HAS_BIAS=bias is not None, PERSISTENT=persistent,
    )


def quantize_rows_int8(x: torch.Tensor, act: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [M, K], float32 scale [M]): `quantize_int8_rowwise` of act(x), M = x.numel() / K."""
    gelu = _check_activation(act)
    flat = _flat_rows(x)
    rows, cols = flat.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]),)  # noqa: E731
    _int8_rowquant_kernel[grid](flat, q, scale, rows, cols, flat.stride(0), q.stride(0), AMAX_FLOOR, GELU=gelu)
    return q, scale


def int8_rowcol_matmul(
    q_act: torch.Tensor,
    act_scale: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """int8 [M, K] (row scales [M]) x int8 [N, K]^T (channel scales [N]) (+ bias [N]) -> [M, N] in out_dtype.

    `kernel`: one of GEMM_KERNELS (default: TD_INT8_GEMM, else DEFAULT_GEMM_KERNEL); wgmma falls back to
    tma-persistent off Hopper or without Gluon, the TMA ones to the pointer kernel where TMA cannot run (before
    Hopper, unaligned rows)."""
    kernel = kernel or default_gemm_kernel()
    if kernel not in GEMM_KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(GEMM_KERNELS)}")
    rows, inner = q_act.shape
    out_features = q_weight.shape[0]
    if q_weight.shape[1] != inner or act_scale.numel() != rows or weight_scale.numel() != out_features:
        raise ValueError("activation, weight and their scales disagree on the shapes")
    if inner > MAX_K:
        raise ValueError(f"K={inner} could overflow the int32 accumulator (at most {MAX_K})")
    q_act, q_weight = q_act.contiguous(), q_weight.contiguous()
    act_scale = act_scale.reshape(-1).float().contiguous()
    weight_scale = weight_scale.reshape(-1).float().contiguous()
    out = torch.empty(rows, out_features, dtype=out_dtype, device=q_act.device)
    if kernel == "wgmma":
        if q_act.is_cuda and _tma_usable(q_act, q_weight, out) and wgmma_int8.available(q_act.device):
            config = wgmma_int8.pick_config(q_act, act_scale, q_weight, weight_scale, bias, out)
            if config is not None:
                return wgmma_int8.wgmma_int8_matmul(q_act, act_scale, q_weight, weight_scale, bias, out, config)
        kernel = "tma-persistent"
    if kernel != "pointer" and _tma_usable(q_act, q_weight, out):
        _launch_tma_gemm(q_act, act_scale, q_weight, weight_scale, bias, out, persistent=kernel == "tma-persistent")
        return out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)  # noqa: E731
    _int8_rowcol_gemm_kernel[grid](
        q_act, act_scale, q_weight, weight_scale, bias if bias is not None else act_scale, out,
        rows, out_features, inner,
        q_act.stride(0), q_weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
    )
    return out


def int8_rowcol_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    act: Optional[str] = None,
) -> torch.Tensor:
    """`w8a8_rowcol_reference(act(x), ...)` on the GPU: row-quantize x, int8 GEMM -> [..., N] in x's dtype."""
    q_act, act_scale = quantize_rows_int8(x, act)
    out = int8_rowcol_matmul(q_act, act_scale, q_weight, weight_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], q_weight.shape[0])


__all__ = ["GEMM_KERNELS", "default_gemm_kernel", "int8_rowcol_linear", "int8_rowcol_matmul", "quantize_rows_int8"]
