"""The per-channel int8 GEMM written in Gluon (Triton's tile-level language with explicit layouts, shared
memory, barriers and Hopper's asynchronous warpgroup MMA), for Hopper GPUs.

Why a second kernel: Triton's software pipeliner keeps a wgmma asynchronous across loop iterations only when
its accumulator is float32; an int8 x int8 -> int32 dot gets a `wait 0` after every K step, so the tensor
cores drain between steps (quant/rowcol_kernels.py reaches ~55% of the H100's int8 peak that way). Here the
loop is written out by hand:

- a ring of NUM_BUFFERS shared-memory stages for the A [BLOCK_M, BLOCK_K] and W [BLOCK_N, BLOCK_K] tiles,
  filled by TMA, one mbarrier per stage (expect-tx bytes, phase parity from a running count);
- each K step issues its wgmma asynchronously and then waits until at most one is in flight, so the next
  step's MMA is queued behind the current one and the tensor cores never wait for the issuing warps;
  the stage the finished MMA read is refilled right away (prefetch distance NUM_BUFFERS - 1);
- persistent programs (one per SM) walk the output tiles in grouped order; the next tile's first loads are
  issued before this tile's epilogue, and the epilogue's TMA store runs while the next tile computes;
- each tile's row scales, column scales and bias are copied into shared memory (cp.async) when the tile
  starts, so the epilogue reads them there instead of waiting on global loads after the last MMA.

The kernel comes in two schedules (`_int8_gemm_wgmma_kernel`'s SPECIALIZED). Without it everything runs in
the same warps (`_single_partition`): the MMA warps issue the TMA loads themselves, and the compiler puts
block-wide barriers around each refill. The default is warp-specialized (`gl.warp_specialize`): a one-warp
loader partition (24 registers, the rest handed to the MMA warps with setmaxnreg) walks the same tiles and K
steps and refills a stage as soon as the MMA warps release it with an mbarrier arrival, so loading runs ahead
through the epilogue and across tiles. The MMA warps never wait for the loader's instructions, only for its
data; they still meet each other once a K step (the compiler puts a barrier of their own threads before the
release, which is what makes one arrival stand for both warpgroups' finished MMAs). H100, FFN up 32760x1536 ->
8960: 0.71-0.72 ms against 0.78-0.81 for the single-partition schedule (bench/results/int8_gemm_ws_h100.json).

Same sums and epilogue as `_int8_rowcol_gemm_kernel`: float32(int32 acc) * sA[m] * sW[n] (+ bias) -> the
output dtype, so the result equals it bit for bit up to the compiler's multiply-add fusion.
Gluon exists from Triton 3.4 on and only compiles for a GPU (no interpreter); `available()` says whether it
can run here.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Optional

import torch
import triton

from turbodiffusion_core.kernels.triton_support import num_sms
from turbodiffusion_core.quant.kernels import _grouped_tile_of

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    # Triton 3.9 renamed the TMA copies (async_copy_global_to_shared -> async_load, async_copy_shared_to_global
    # -> async_store; same arguments); the GPU image runs 3.6
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # same rename
    _block_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # 3.9: barrier()
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - Triton without Gluon
    gluon = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


INT8_WGMMA_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)
"""The N sizes a wgmma instruction takes with 8-bit integer operands (no 256, unlike the float types)."""


@functools.cache
def _instr_n(block_m: int, block_n: int, num_warps: int) -> int:
    """Widest int8 wgmma N that tiles BLOCK_N across the warps left over after M."""
    m_reps = triton.cdiv(block_m, 16)
    n_reps = triton.cdiv(num_warps, m_reps)
    widest = max(block_n // n_reps, 8)
    return next(n for n in INT8_WGMMA_N if n <= widest and block_n % n == 0)


@functools.cache
def _warps_per_cta(block_m: int, num_warps: int) -> tuple[int, int]:
    """Warps along (M, N): 4-warp groups stacked along M while M has 16 rows a warp left, then along N."""
    along_m, along_n = 4, 1
    while along_m * along_n < num_warps:
        if block_m > 16 * along_m:
            along_m *= 2
        else:
            along_n *= 2
    return along_m, along_n


if gluon is not None:

    @gluon.jit
    def _tile_coords(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """(off_m, off_n) of output tile number `tile` in grouped order (GROUP_M row tiles share W tiles in L2)."""
        pid_m, pid_n = _grouped_tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _load_stage(a_desc, w_desc, a_bufs, w_bufs, bars, produced, off_m, off_n, k, NUM_BUFFERS: gl.constexpr):
        """TMA-load the K step at column k of tile (off_m, off_n) into stage produced % NUM_BUFFERS."""
        index = produced % NUM_BUFFERS
        bar = bars.index(index)
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
        _tma_load(a_desc, [off_m, k], bar, a_bufs.index(index))
        _tma_load(w_desc, [off_n, k], bar, w_bufs.index(index))
        return produced + 1

    @gluon.jit
    def _first_loads(a_desc, w_desc, a_bufs, w_bufs, bars, produced, tile, tiles, k_steps, M, N,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                     NUM_BUFFERS: gl.constexpr):
        """Issue the first min(NUM_BUFFERS - 1, k_steps) loads of `tile` (nothing past the last tile)."""
        if tile < tiles:
            off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            for s in range(0, gl.minimum(NUM_BUFFERS - 1, k_steps)):
                produced = _load_stage(a_desc, w_desc, a_bufs, w_bufs, bars, produced, off_m, off_n, s * BLOCK_K,
                                       NUM_BUFFERS)
        return produced

    @gluon.jit
    def _prefetch_scales(a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N,
                         HAS_BIAS: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Start copying this tile's row scales, column scales and bias into shared memory (cp.async, one
        group): they arrive while the tile's MMAs run instead of being waited for in the epilogue."""
        f32_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        pair_layout: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [NUM_WARPS, 1], [1, 0])
        rows = off_m + gl.arange(0, a_s.type.shape[0], layout=f32_layout)
        _cp_async(a_s, a_scale_ptr + rows, mask=rows < M)
        cols = off_n + gl.arange(0, w_s.type.shape[0], layout=f32_layout)
        _cp_async(w_s, w_scale_ptr + cols, mask=cols < N)
        if HAS_BIAS:
            # cp.async moves at least 4 bytes: the bf16 bias goes as [BLOCK_N / 2, 2] pairs, each pair in or
            # out of N as a whole (N is even: the output's rows are 16-byte aligned)
            PAIRS: gl.constexpr = b_s.type.shape[0] // 2
            first = off_n + 2 * gl.arange(0, PAIRS, layout=gl.SliceLayout(1, pair_layout))
            pairs = first[:, None] + gl.arange(0, 2, layout=gl.SliceLayout(0, pair_layout))[None, :]
            inside = gl.broadcast(first[:, None] < N, pairs)[0]
            _cp_async(b_s.reshape([PAIRS, 2]), bias_ptr + pairs, mask=inside)
        async_copy.commit_group()

    @gluon.jit
    def _start_tile(tile, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, GROUP_M: gl.constexpr,
                    HAS_BIAS: gl.constexpr, PREFETCH: gl.constexpr, NUM_WARPS: gl.constexpr,
                    acc_layout: gl.constexpr):
        """(off_m, off_n) of `tile`, a zero accumulator, and with PREFETCH the tile's scales and bias on their way
        into shared memory (the previous tile's epilogue has read them: a barrier precedes its TMA store)."""
        BLOCK_M: gl.constexpr = a_s.type.shape[0]
        BLOCK_N: gl.constexpr = w_s.type.shape[0]
        off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if PREFETCH:
            _prefetch_scales(a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N, HAS_BIAS,
                             NUM_WARPS)
        return off_m, off_n, gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=acc_layout)

    @gluon.jit
    def _epilogue(acc, c_desc, c_smem, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N,
                  HAS_BIAS: gl.constexpr, PREFETCH: gl.constexpr):
        """float32(acc) * sA[m] * sW[n] (+ bias) -> c_smem -> TMA store (rows/cols past M, N are clipped); the
        scales from shared memory when `_prefetch_scales` brought them, else from global memory."""
        BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        rows_layout: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
        if PREFETCH:
            async_copy.wait_group(0)
            _block_barrier()  # every thread's copies are in
            a_scale = a_s.load(rows_layout)
            w_scale = w_s.load(cols_layout)
        else:
            offs_m = off_m + gl.arange(0, BLOCK_M, layout=rows_layout)
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=cols_layout)
            a_scale = gl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
            w_scale = gl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = acc.to(gl.float32) * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            if PREFETCH:
                bias = b_s.load(cols_layout)
            else:
                bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            out += bias.to(gl.float32)[None, :]
        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(out.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)

    @gluon.jit
    def _scale_buffers(a_scale_ptr, bias_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        a_s = gl.allocate_shared_memory(gl.float32, [BLOCK_M], vec_layout)
        w_s = gl.allocate_shared_memory(gl.float32, [BLOCK_N], vec_layout)
        b_s = gl.allocate_shared_memory(bias_ptr.dtype.element_ty, [BLOCK_N], vec_layout)
        return a_s, w_s, b_s

    @gluon.jit
    def _single_partition(a_desc, w_desc, c_desc, a_bufs, w_bufs, bars, c_smem, a_s, w_s, b_s, a_scale_ptr,
                          w_scale_ptr, bias_ptr, M, N, K, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                          PREFETCH: gl.constexpr, NUM_WARPS: gl.constexpr, acc_layout: gl.constexpr):
        """Every warp issues the loads and the MMAs: the refill of the stage the previous MMA read follows each
        K step's MMA, and the next tile's first loads go out before this tile's epilogue."""
        BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        NUM_BUFFERS: gl.constexpr = a_bufs.type.shape[0]
        tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        step = gl.num_programs(0)
        produced = _first_loads(a_desc, w_desc, a_bufs, w_bufs, bars, gl.to_tensor(0), gl.program_id(0), tiles,
                                k_steps, M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_BUFFERS)
        consumed = gl.to_tensor(0)
        for tile in range(gl.program_id(0), tiles, step):
            off_m, off_n, acc = _start_tile(tile, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, GROUP_M,
                                            HAS_BIAS, PREFETCH, NUM_WARPS, acc_layout)
            for kt in range(0, k_steps):
                index = consumed % NUM_BUFFERS
                mbarrier.wait(bars.index(index), (consumed // NUM_BUFFERS) & 1)
                acc = warpgroup_mma(a_bufs.index(index), w_bufs.index(index).permute((1, 0)), acc, is_async=True)
                # at most this step's MMA still runs: the stage the previous one read is free to refill
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                consumed += 1
                if kt + NUM_BUFFERS - 1 < k_steps:
                    produced = _load_stage(a_desc, w_desc, a_bufs, w_bufs, bars, produced, off_m, off_n,
                                           (kt + NUM_BUFFERS - 1) * BLOCK_K, NUM_BUFFERS)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            # the next tile's first K steps load while this tile's epilogue runs
            produced = _first_loads(a_desc, w_desc, a_bufs, w_bufs, bars, produced, tile + step, tiles, k_steps,
                                    M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_BUFFERS)
            _epilogue(acc, c_desc, c_smem, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N,
                      HAS_BIAS, PREFETCH)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _ws_loader(a_desc, w_desc, a_bufs, w_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
        """Loader partition (one warp): walks the program's tiles and K steps in the consumers' order and
        TMA-loads each step into the next free stage (waits for the consumers to release it)."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        NUM_BUFFERS: gl.constexpr = a_bufs.type.shape[0]
        tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        produced = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            for kt in range(0, k_steps):
                # a fresh barrier counts as released once (parity 1): the first pass does not wait
                mbarrier.wait(empty.index(produced % NUM_BUFFERS), ((produced // NUM_BUFFERS) & 1) ^ 1)
                produced = _load_stage(a_desc, w_desc, a_bufs, w_bufs, ready, produced, off_m, off_n, kt * BLOCK_K,
                                       NUM_BUFFERS)

    @gluon.jit
    def _ws_consumer(a_bufs, w_bufs, ready, empty, c_desc, c_smem, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr,
                     bias_ptr, M, N, K, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_K: gl.constexpr,
                     PREFETCH: gl.constexpr, NUM_WARPS: gl.constexpr, acc_layout: gl.constexpr):
        """Default partition (the kernel's num_warps): the MMAs (one wgmma group kept in flight, each stage
        released as soon as the MMA reading it is done) and the epilogue, tile after tile."""
        BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        NUM_BUFFERS: gl.constexpr = a_bufs.type.shape[0]
        tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        consumed = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n, acc = _start_tile(tile, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, GROUP_M,
                                            HAS_BIAS, PREFETCH, NUM_WARPS, acc_layout)
            for kt in range(0, k_steps):
                index = consumed % NUM_BUFFERS
                mbarrier.wait(ready.index(index), (consumed // NUM_BUFFERS) & 1)
                acc = warpgroup_mma(a_bufs.index(index), w_bufs.index(index).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                # the previous step's MMA is done: its stage goes back to the loader
                mbarrier.arrive(empty.index((consumed + NUM_BUFFERS - 1) % NUM_BUFFERS), pred=kt > 0)
                consumed += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((consumed + NUM_BUFFERS - 1) % NUM_BUFFERS))
            _epilogue(acc, c_desc, c_smem, a_s, w_s, b_s, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N,
                      HAS_BIAS, PREFETCH)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _int8_gemm_wgmma_kernel(
        a_desc, w_desc, c_desc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr,
        WARPS_M: gl.constexpr, WARPS_N: gl.constexpr, INSTR_N: gl.constexpr, PREFETCH: gl.constexpr,
        SPECIALIZED: gl.constexpr, num_warps: gl.constexpr,
    ):
        """C[M, N] = float(A . W^T) * sA[:, None] * sW[None, :] (+ bias); persistent: a grid of at most the
        number of SMs times the configuration's programs an SM. SPECIALIZED: a one-warp loader partition keeps
        the stage ring full (across tiles, through the epilogue) and the MMA warps wait for its data on
        mbarriers, never for its instructions; otherwise `_single_partition`."""
        BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                             instr_shape=[16, INSTR_N, 32])
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_BUFFERS, BLOCK_M, BLOCK_K], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_BUFFERS, BLOCK_N, BLOCK_K], w_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
        a_s, w_s, b_s = _scale_buffers(a_scale_ptr, bias_ptr, BLOCK_M, BLOCK_N)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
        if SPECIALIZED:  # the stages the MMA warps hand back to the loader
            empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_BUFFERS):
            mbarrier.init(ready.index(i), count=1)
            if SPECIALIZED:
                mbarrier.init(empty.index(i), count=1)
        if SPECIALIZED:
            gl.warp_specialize([
                (_ws_consumer, (a_bufs, w_bufs, ready, empty, c_desc, c_smem, a_s, w_s, b_s, a_scale_ptr,
                                w_scale_ptr, bias_ptr, M, N, K, HAS_BIAS, GROUP_M, BLOCK_K, PREFETCH, num_warps,
                                acc_layout)),
                (_ws_loader, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, M, N, K, GROUP_M)),
            ], [1], [24])
        else:
            _single_partition(a_desc, w_desc, c_desc, a_bufs, w_bufs, ready, c_smem, a_s, w_s, b_s, a_scale_ptr,
                              w_scale_ptr, bias_ptr, M, N, K, HAS_BIAS, GROUP_M, PREFETCH, num_warps, acc_layout)
            for i in gl.static_range(NUM_BUFFERS):
                mbarrier.invalidate(ready.index(i))


WGMMA_CONFIGS = (
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, NUM_BUFFERS, programs per SM, warp-specialized); shared memory a
    # program = buffers * (BM + BN) * BK + BM * BN * out bytes (+ scales, barriers); TMA block sides are powers
    # of two. H100, 32760 tokens, scales prefetched, in this order (bench/results/int8_gemm_ws_h100.json):
    # FFN up 0.724 / 0.714 / 0.722 / 0.748 / 0.813 / 0.787 ms, FFN down 0.634 / 0.650 / 0.660 / 0.680 / 0.639 /
    # 0.650 ms. Dropped: 128x128x128 with 8 warps (0.870 / 0.743), 128x256x64 with 4 or 6 buffers unspecialized
    # (0.811 / 0.776 at FFN up); earlier, two programs an SM on 128x128x64 tiles (0.90 and 1.22 ms at FFN up,
    # int8_gemm_wgmma_h100_d.json).
    (128, 256, 64, 8, 5, 1, 1),
    (128, 256, 64, 8, 6, 1, 1),
    (128, 256, 128, 8, 3, 1, 1),
    (128, 128, 128, 4, 4, 1, 1),
    (128, 256, 128, 8, 3, 1, 0),
    (128, 256, 64, 8, 5, 1, 0),
)
DEFAULT_WGMMA_CONFIG = WGMMA_CONFIGS[0]
PREFETCH_SCALES = os.environ.get("TD_WGMMA_PREFETCH_SCALES", "1") != "0"
"""Copy each tile's scales and bias into shared memory while its MMAs run (cp.async) instead of loading them
from global memory in the epilogue (TD_WGMMA_PREFETCH_SCALES=0: the latter; same bits either way)."""
SHARED_MEMORY_FALLBACK = 227 * 1024
"""Shared memory a block may opt into when torch does not report it (an H100's 227 KB)."""
_chosen: dict[tuple, Optional[tuple[int, ...]]] = {}
_tuning = threading.Lock()
log = logging.getLogger(__name__)


def shared_memory_bytes(config: tuple[int, ...], out_element_size: int) -> int:
    """Shared memory one program of `config` allocates: the operand ring, the output tile, the barriers."""
    block_m, block_n, block_k, _, buffers, _, _ = config
    return buffers * (block_m + block_n) * block_k + block_m * block_n * out_element_size + 1024 + 3 * 4 * block_n


@functools.lru_cache(maxsize=16)
def _shared_memory_limit(index: int) -> int:
    """What one block may opt into: the SM's shared memory less the 1 KB the driver keeps (227 KB on Hopper)."""
    per_sm = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_multiprocessor", 0)
    return int(per_sm) - 1024 if per_sm else SHARED_MEMORY_FALLBACK


def fitting_configs(out: torch.Tensor) -> list[tuple[int, ...]]:
    """WGMMA_CONFIGS whose programs fit the device's shared memory with this output's element size (an fp32
    output tile is twice a bf16 one)."""
    limit = _shared_memory_limit(_cuda_index(out.device))
    return [c for c in WGMMA_CONFIGS if shared_memory_bytes(c, out.element_size()) * c[5] <= limit]


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the Gluon kernel can run: Gluon importable, a Hopper CUDA device (wgmma is Hopper's alone)."""
    if gluon is None or not torch.cuda.is_available():
        return False
    device = device or torch.device("cuda")
    return device.type == "cuda" and _is_hopper(_cuda_index(device))


def _cuda_index(device: torch.device) -> int:
    """A CUDA device's index ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def unavailable_reason() -> str:
    if gluon is None:
        return f"Triton's Gluon is not importable ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return "the Gluon int8 kernel is written for Hopper (compute capability 9.x) wgmma"


_TORCH_TO_GL = {}
if gluon is not None:
    _TORCH_TO_GL = {torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                    torch.float32: gl.float32}


@functools.lru_cache(maxsize=64)
def _shared_layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _TORCH_TO_GL[dtype])


def _descriptor(t: torch.Tensor, block: list[int]):
    return GluonTensorDescriptor(t, list(t.shape), list(t.stride()), block, _shared_layout(tuple(block), t.dtype))


def wgmma_int8_matmul(q_act: torch.Tensor, act_scale: torch.Tensor, q_weight: torch.Tensor,
                      weight_scale: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                      config: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """out[M, N] = float(q_act . q_weight^T) * act_scale[:, None] * weight_scale[None, :] (+ bias).

    q_act int8 [M, K] and q_weight int8 [N, K] contiguous with 16-byte aligned rows (K % 16 == 0), scales
    float32, out [M, N] bf16/fp16/fp32 with 16-byte aligned rows. Callers check `available()` first.
    `config`: one of WGMMA_CONFIGS; by default `pick_config`'s (ValueError when none fits)."""
    if config is None:
        config = pick_config(q_act, act_scale, q_weight, weight_scale, bias, out)
        if config is None:
            raise ValueError(f"no Gluon int8 GEMM configuration fits this GPU for a {out.dtype} output")
    _launch(q_act, act_scale, q_weight, weight_scale, bias, out, config)
    return out


def _aligned(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The bias as the kernels take it: contiguous from a 16-byte aligned address (the scale prefetch copies it
    in 4-byte pairs, which needs the alignment known at compile time); a copy only when it is not already."""
    if bias is not None and (bias.data_ptr() % 16 or bias.stride(-1) != 1):
        return bias.contiguous().clone()
    return bias


def pick_config(q_act, act_scale, q_weight, weight_scale, bias, out) -> Optional[tuple[int, ...]]:
    """The fastest fitting configuration for this (M, N, K, output dtype, bias), timed once on the first call
    (all give the same bits); None when none compiles for this GPU (the caller runs another kernel).

    To keep a worker's warm-up short (each configuration is a compile), the single-partition kernel is tried
    only when no warp-specialized configuration runs (it was slower at every DiT shape measured), and a GEMM
    of at most one wave of tiles (the text cross-attention's keys and values, say) takes the first
    configuration that runs without trying the others. A configuration that fails to compile or lower is
    logged and skipped. Timing launches the candidates on the current stream, so a first call made while a CUDA
    graph is being captured takes the first fitting configuration untimed (the pipeline's warm-up runs
    eagerly first)."""
    key = (q_act.shape[0], q_weight.shape[0], q_act.shape[1], out.dtype, bias is not None, q_act.device)
    if key in _chosen:
        return _chosen[key]
    candidates = fitting_configs(out)
    if torch.cuda.is_current_stream_capturing():
        return candidates[0] if candidates else None
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    with _tuning:
        if key in _chosen:
            return _chosen[key]
        timings = {}
        one_wave = bool(candidates) and _tiles(q_act.shape[0], q_weight.shape[0], candidates[0]) <= num_sms(q_act.device)
        for config in candidates:
            if timings and (one_wave or (not config[6] and any(c[6] for c in timings))):
                continue
            try:
                timings[config] = _time_ms(lambda config=config: _launch(q_act, act_scale, q_weight, weight_scale,
                                                                         bias, out, config))
            except (CompilationError, OutOfResources, RuntimeError) as exc:  # RuntimeError: a failed LLVM lowering
                log.warning("int8 GEMM config %s does not run here: %s", config, str(exc).splitlines()[0][:200])
        _chosen[key] = min(timings, key=timings.get) if timings else None
        log.info("int8 GEMM %dx%dx%d -> %s: config %s (%s)", key[0], key[2], key[1], out.dtype, _chosen[key],
                 ", ".join(f"{c}: {ms:.3f} ms" for c, ms in timings.items()))
        return _chosen[key]


def _tiles(rows: int, cols: int, config: tuple[int, ...]) -> int:
    return triton.cdiv(rows, config[0]) * triton.cdiv(cols, config[1])


def _time_ms(fn, reps: int = 10) -> float:
    """Mean milliseconds of fn on the current stream (one untimed call first: compilation)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def max_registers(num_warps: int, specialized: int) -> Optional[int]:
    """Registers a thread for a warp-specialized launch (None otherwise): the register file (64K) over the
    warps the kernel occupies (its num_warps plus the loader warp, rounded up to whole warpgroups), a multiple
    of 8 and at most 256. The loader gives back all but 24 and the MMA warps take them up."""
    if not specialized:
        return None
    warps = -(-(num_warps + 1) // 4) * 4
    return min(256, 65536 // (warps * 32) // 8 * 8)


def _launch(q_act, act_scale, q_weight, weight_scale, bias, out, config) -> None:
    block_m, block_n, block_k, warps, buffers, per_sm, specialized = config
    bias = _aligned(bias)
    rows, inner = q_act.shape
    cols = q_weight.shape[0]
    a_desc = _descriptor(q_act, [block_m, block_k])
    w_desc = _descriptor(q_weight, [block_n, block_k])
    c_desc = _descriptor(out, [block_m, block_n])
    tiles = _tiles(rows, cols, config)
    warps_m, warps_n = _warps_per_cta(block_m, warps)
    _int8_gemm_wgmma_kernel[(min(tiles, per_sm * num_sms(q_act.device)),)](
        a_desc, w_desc, c_desc, act_scale, weight_scale, bias if bias is not None else act_scale,
        rows, cols, inner,
        HAS_BIAS=bias is not None, GROUP_M=8, NUM_BUFFERS=buffers, WARPS_M=warps_m, WARPS_N=warps_n,
        INSTR_N=_instr_n(block_m, block_n, warps), PREFETCH=PREFETCH_SCALES, SPECIALIZED=bool(specialized),
        num_warps=warps, maxnreg=max_registers(warps, specialized),
    )


__all__ = ["WGMMA_CONFIGS", "available", "fitting_configs", "pick_config", "unavailable_reason", "wgmma_int8_matmul"]
