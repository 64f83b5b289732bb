"""The per-channel ("rowcol") int8 path: Triton row quantizer and GEMM against their exact PyTorch
reference, the quantization error against the float linear, and `TileInt8Linear`'s choice of kernel
(TD_INT8_KERNEL) with its `-quant` state-dict round trip.

CPU: the `on_cpu` tests run in the shared Triton-interpreter process (tests/kernel_support.py), where the
kernels run on CPU tensors and `TileInt8Linear` takes its GPU path. GPU (`on_gpu`): the same checks at a
realistic width.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernel_support import check_interpreter_run, on_cpu, on_gpu, rel_err  # noqa: E402

from turbodiffusion_core.quant import rowcol_kernels as rk  # noqa: E402
from turbodiffusion_core.quant.rowcol_int8 import (  # noqa: E402
    channel_int8_from_tiles,
    quantize_int8_rowwise,
    w8a8_rowcol_reference,
)
from turbodiffusion_core.quant.tile_int8 import (  # noqa: E402
    TileInt8Linear,
    quantize_tile_int8,
    w8a8_tile_reference,
)


def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)


def activations(rows: int, cols: int, device: str = "cpu", dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus an all-zero row and a tiny row (the amax floor and a huge 127/amax)."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, device=device) * 3
    x[1] = 0.0
    x[2] *= 1e-5
    return x.to(dtype)


def weights(out_features: int, in_features: int, device: str = "cpu", seed: int = 1):
    gen = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen, device=device) * 0.05
    bias = torch.randn(out_features, generator=gen, device=device) * 0.1
    return weight, bias.to(torch.bfloat16)


def tile_state(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """A `-quant` checkpoint's tensors for one linear."""
    q, scale = quantize_tile_int8(weight)
    return {"bias": bias.clone(), "int8_weight": q, "scale": scale}


@on_cpu
@pytest.mark.parametrize("rows, cols", [(37, 200), (5, 2100)])  # one read; two chunked reads (K > BLOCK_K)
def test_int8_row_quantizer_matches_reference_exactly(rows, cols):
    x = activations(rows, cols).view(1, rows, cols)
    q, scale = rk.quantize_rows_int8(x)
    ref_q, ref_scale = quantize_int8_rowwise(x.view(rows, cols))
    assert q.dtype == torch.int8 and q.shape == (rows, cols) and scale.shape == (rows,)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q)
    assert q.abs().max() == 127 and q[1].abs().sum() == 0


@on_cpu
@pytest.mark.parametrize("cols", [96, 2100])
def test_int8_row_quantizer_with_fused_gelu(cols):
    x = activations(16, cols, dtype=torch.float32)
    q, scale = rk.quantize_rows_int8(x, act="gelu_tanh")
    ref_q, ref_scale = quantize_int8_rowwise(F.gelu(x, approximate="tanh"))
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    assert (q.int() - ref_q.int()).abs().max() <= 1  # GELU's last-bit differences may move a rounding
    assert (q == ref_q).float().mean() > 0.99
    with pytest.raises(ValueError, match="activation"):
        rk.quantize_rows_int8(x, act="relu")


@on_cpu
@pytest.mark.parametrize("rows, inner, outer", [(200, 256, 192), (70, 64, 48), (130, 320, 200)])
def test_rowcol_gemm_equals_reference(rows, inner, outer):
    """Ragged M and N, K a multiple of 128 or not: the same float steps as the reference, so equal bits."""
    x = activations(rows, inner, dtype=torch.float32)
    weight, bias = weights(outer, inner)
    q_weight, w_scale = quantize_int8_rowwise(weight)
    q_act, a_scale = rk.quantize_rows_int8(x)
    out = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32)
    ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
    assert out.shape == (rows, outer)
    assert torch.equal(out, ref)
    no_bias = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, out_dtype=torch.float32)
    assert rel_err(no_bias, ref - bias.float()) < 1e-5


@on_cpu
@pytest.mark.parametrize("kernel", ["tma", "tma-persistent"])
@pytest.mark.parametrize("rows, inner, outer", [(200, 256, 192), (70, 64, 48), (130, 320, 200)])
def test_tma_gemm_equals_reference(kernel, rows, inner, outer):
    """The TMA kernels (descriptor loads read zeros past M, N, K; the store skips them): equal bits too."""
    x = activations(rows, inner, dtype=torch.float32)
    weight, bias = weights(outer, inner)
    q_weight, w_scale = quantize_int8_rowwise(weight)
    q_act, a_scale = rk.quantize_rows_int8(x)
    ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
    out = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32, kernel=kernel)
    assert torch.equal(out, ref)
    no_bias = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, out_dtype=torch.float32, kernel=kernel)
    assert rel_err(no_bias, ref - bias.float()) < 1e-5


@on_cpu
def test_gemm_kernel_choice(monkeypatch):
    """TD_INT8_GEMM picks the kernel; rows TMA cannot address (not 16-byte multiples) take the pointer one."""
    x = activations(33, 100, dtype=torch.float32)  # K = 100 bytes a row: no TMA
    weight, bias = weights(40, 100)
    q_weight, w_scale = quantize_int8_rowwise(weight)
    q_act, a_scale = rk.quantize_rows_int8(x)
    ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
    for name in rk.GEMM_KERNELS:
        monkeypatch.setenv("TD_INT8_GEMM", name)
        assert rk.default_gemm_kernel() == name
        assert torch.equal(rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32), ref)
    monkeypatch.setenv("TD_INT8_GEMM", "cutlass")
    with pytest.raises(ValueError, match="TD_INT8_GEMM"):
        rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias)
    with pytest.raises(ValueError, match="kernel"):
        rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, kernel="cutlass")


@on_cpu
def test_every_autotune_config_gives_the_same_result(monkeypatch):
    """The interpreter launches an autotuned kernel with its first config; here each config in turn."""
    from turbodiffusion_core.quant import kernels as qk

    x = activations(9, 2100, dtype=torch.float32)
    ref_q, ref_scale = quantize_int8_rowwise(x)
    for config in rk.ROWQUANT_CONFIGS:  # BLOCK_K below and above K: the chunked and the one-read path
        monkeypatch.setattr(rk._int8_rowquant_kernel, "config", config)
        q, scale = rk.quantize_rows_int8(x)
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale), config

    for inner in (320, 384):  # K a multiple of some BLOCK_K (64; 64 and 128), not of the others
        x = activations(70, inner, dtype=torch.float32)  # M and N ragged for every block size
        weight, bias = weights(72, inner)
        q_act, a_scale = quantize_int8_rowwise(x)
        q_weight, w_scale = quantize_int8_rowwise(weight)
        ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
        for config in rk.GEMM_CONFIGS:
            monkeypatch.setattr(rk._int8_rowcol_gemm_kernel, "config", config)
            out = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32,
                                        kernel="pointer")
            assert torch.equal(out, ref), config
        for config in rk.TMA_GEMM_CONFIGS:  # the pre-hook sets each config's descriptor blocks
            monkeypatch.setattr(rk._int8_rowcol_gemm_tma_kernel, "config", config)
            for kernel in ("tma", "tma-persistent"):
                out = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32,
                                            kernel=kernel)
                assert torch.equal(out, ref), (kernel, config)
        q_tiles, tile_scale = quantize_tile_int8(weight)
        q_act, act_scale = quantize_tile_int8(x)
        ref = w8a8_tile_reference(x, q_tiles, tile_scale, bias)
        for config in qk.TILE_GEMM_CONFIGS:
            monkeypatch.setattr(qk._int8_tile_gemm_kernel, "config", config)
            out = qk.int8_tile_matmul(q_act, act_scale, q_tiles, tile_scale, bias, out_dtype=torch.float32)
            assert rel_err(out, ref) < 1e-6, config


@on_cpu
def test_rowcol_linear_stays_near_the_float_linear():
    x = activations(96, 320, dtype=torch.bfloat16).view(3, 32, 320)
    weight, bias = weights(200, 320)
    dense = F.linear(x.float(), weight, bias.float())
    q_weight, w_scale = quantize_int8_rowwise(weight)
    out = rk.int8_rowcol_linear(x, q_weight, w_scale, bias)
    assert out.shape == (3, 32, 200) and out.dtype == torch.bfloat16
    assert rel_err(out, dense) < 3e-2
    # the released checkpoints' path: tiles re-quantized per channel (two roundings of the weight)
    q_tiles, tile_scale = quantize_tile_int8(weight)
    out_tiles = rk.int8_rowcol_linear(x, *channel_int8_from_tiles(q_tiles, tile_scale), bias)
    assert rel_err(out_tiles, dense) < 3e-2


@on_cpu
@pytest.mark.parametrize("assign", [False, True])
def test_quant_state_dict_round_trip_with_rowcol(monkeypatch, assign):
    """Load a -quant linear's tensors, run the GPU path, get the checkpoint layout back from state_dict()."""
    monkeypatch.setenv("TD_INT8_KERNEL", "rowcol")
    weight, bias = weights(150, 200)
    state = tile_state(weight, bias)
    layer = TileInt8Linear(200, 150)
    layer.load_state_dict({k: v.clone() for k, v in state.items()}, assign=assign)
    assert not layer.per_channel  # a CPU load keeps the tiles (on CUDA the load converts at once)
    x = activations(40, 200, dtype=torch.float32)  # float32 out: the interpreter truncates to bf16
    out = layer.kernel_forward(x, None)  # what forward runs on a GPU: converts, then the rowcol kernel
    assert layer.per_channel and layer.scale.shape == (150,)
    q_ch, s_ch = channel_int8_from_tiles(state["int8_weight"], state["scale"])
    assert torch.equal(layer.int8_weight, q_ch) and torch.equal(layer.scale, s_ch)
    assert torch.equal(out, w8a8_rowcol_reference(x, q_ch, s_ch, bias))
    assert torch.equal(layer(x), out)  # the CPU forward follows the layout: the same math
    assert rel_err(out, F.linear(x.float(), weight, bias.float())) < 3e-2

    saved = layer.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {k: (v.dtype, v.shape) for k, v in state.items()}
    assert torch.equal(saved["bias"], state["bias"])
    assert rel_err(w8a8_tile_reference(x, saved["int8_weight"], saved["scale"]),
                   w8a8_tile_reference(x, state["int8_weight"], state["scale"])) < 2e-2
    layer.load_state_dict(saved)  # back in: the tile layout again
    assert not layer.per_channel and torch.equal(layer.int8_weight, saved["int8_weight"])


@on_cpu
def test_int8_kernel_selection(monkeypatch):
    monkeypatch.setenv("TD_INT8_KERNEL", "tile")
    weight, bias = weights(150, 200)
    state = tile_state(weight, bias)
    layer = TileInt8Linear(200, 150)
    layer.load_state_dict(state)
    x = activations(40, 200, dtype=torch.float32)  # float32 out: the interpreter truncates to bf16
    out = layer.kernel_forward(x, None)
    assert not layer.per_channel
    assert rel_err(out, w8a8_tile_reference(x, state["int8_weight"], state["scale"], bias)) < 1e-2
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())  # the file's bits
    monkeypatch.setenv("TD_INT8_KERNEL", "rowcol")  # the same module converts on its next GPU forward
    out = layer.kernel_forward(x, None)
    assert layer.per_channel
    q_ch, s_ch = channel_int8_from_tiles(state["int8_weight"], state["scale"])
    assert torch.equal(out, w8a8_rowcol_reference(x, q_ch, s_ch, bias))
    monkeypatch.setenv("TD_INT8_KERNEL", "int4")
    with pytest.raises(ValueError, match="TD_INT8_KERNEL"):
        TileInt8Linear(200, 150).kernel_forward(x, None)


@on_gpu
@pytest.mark.gpu
def test_gpu_rowcol_matches_reference_and_both_kernels_run(monkeypatch):
    x = activations(1000, 1536, device="cuda")
    weight, bias = weights(1024, 1536, device="cuda")
    dense = F.linear(x.float(), weight, bias.float())
    q_weight, w_scale = quantize_int8_rowwise(weight)
    q_act, a_scale = rk.quantize_rows_int8(x)
    ref_q, ref_scale = quantize_int8_rowwise(x)
    mismatch = float((q_act != ref_q).float().mean())
    out = rk.int8_rowcol_linear(x, q_weight, w_scale, bias)
    ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
    gelu_q, gelu_scale = rk.quantize_rows_int8(x, act="gelu_tanh")
    gelu_ref_q, gelu_ref_scale = quantize_int8_rowwise(F.gelu(x.float(), approximate="tanh"))
    print("rowcol:", dict(mismatch=mismatch, err=rel_err(out, ref), vs_bf16=rel_err(out, dense)))
    assert mismatch < 1e-3 and rel_err(a_scale, ref_scale) < 1e-6
    assert rel_err(out, ref) < 1e-2 and rel_err(out, dense) < 3e-2
    assert float((gelu_q != gelu_ref_q).float().mean()) < 1e-2 and rel_err(gelu_scale, gelu_ref_scale) < 1e-5

    linear = torch.nn.Linear(1536, 1024, device="cuda")
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    monkeypatch.setenv("TD_INT8_KERNEL", "rowcol")
    direct = TileInt8Linear.from_linear(linear)  # a float weight on the GPU: quantized per channel at once
    assert direct.per_channel and torch.equal(direct.int8_weight, q_weight) and torch.equal(direct.scale, w_scale)

    state = tile_state(weight, bias)
    for choice, per_channel in (("tile", False), ("rowcol", True)):
        monkeypatch.setenv("TD_INT8_KERNEL", choice)
        layer = TileInt8Linear(1536, 1024, device="cuda")
        layer.load_state_dict(state)
        assert layer.per_channel == per_channel  # converted by the load itself
        out = layer(x)
        assert rel_err(out, dense) < 3e-2
        assert {k: (v.dtype, v.shape) for k, v in layer.state_dict().items()} == {
            k: (v.dtype, v.shape) for k, v in state.items()
        }


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["tma", "tma-persistent", "wgmma"])
def test_gpu_tma_gemm_matches_pointer_gemm(kernel):
    """Fresh random operands at a ragged realistic shape: the TMA kernels against the pointer kernel and the
    reference (the same float steps; FMA contraction may move a last bit)."""
    x = activations(1000 + 37, 1536, device="cuda", seed=int(torch.randint(0, 2**31, ())))
    weight, bias = weights(1024 + 8, 1536, device="cuda")
    q_weight, w_scale = quantize_int8_rowwise(weight)
    q_act, a_scale = rk.quantize_rows_int8(x)
    ref = w8a8_rowcol_reference(x, q_weight, w_scale, bias)
    pointer = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, kernel="pointer")
    out = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, kernel=kernel)
    print(kernel, dict(vs_pointer=rel_err(out, pointer), vs_reference=rel_err(out, ref)))
    assert rel_err(out, pointer) < 1e-6 and rel_err(out, ref) < 1e-2


def test_int8_rows_give_the_product_of_the_rows_as_they_are():
    """A per-channel layer fed `Int8Rows` (what the fused norm writes) computes from those int8 values and
    scales directly, in bf16 too (dequantizing to bf16 and quantizing again would move some values)."""
    from turbodiffusion_core.quant.rowcol_int8 import Int8Rows

    x = activations(40, 256, dtype=torch.bfloat16, seed=4)
    weight, bias = weights(48, 256)
    layer = TileInt8Linear(256, 48)
    layer.set_weight(weight)
    layer.bias.copy_(bias)
    layer.to_per_channel()
    assert layer.takes_int8_rows
    q, scale = quantize_int8_rowwise(x)
    out = layer(Int8Rows(q.view(4, 10, 256), scale.view(40, 1), torch.bfloat16))
    assert out.shape == (4, 10, 48) and out.dtype == torch.bfloat16
    assert torch.equal(out.view(40, 48), w8a8_rowcol_reference(x, layer.int8_weight, layer.scale, layer.bias))
    with pytest.raises(ValueError, match="no activation"):
        layer(Int8Rows(q, scale.view(40, 1), torch.bfloat16), act="gelu_tanh")


def test_wgmma_configs_fit_hopper_and_their_instruction_shapes():
    """Every Gluon GEMM configuration fits an H100's shared memory (with the programs an SM it asks for), its TMA
    blocks are powers of two, and the wgmma N it gets is one int8 wgmma takes and tiles BLOCK_N."""
    from turbodiffusion_core.quant import wgmma_int8

    too_big_for_fp32 = []
    for config in wgmma_int8.WGMMA_CONFIGS:
        block_m, block_n, block_k, warps, buffers, per_sm, specialized = config
        assert wgmma_int8.shared_memory_bytes(config, 2) * per_sm <= wgmma_int8.SHARED_MEMORY_FALLBACK, config
        if wgmma_int8.shared_memory_bytes(config, 4) * per_sm > wgmma_int8.SHARED_MEMORY_FALLBACK:
            too_big_for_fp32.append(config)  # a float32 output tile is twice as large: fitting_configs skips them
        assert all(x & (x - 1) == 0 for x in (block_m, block_n, block_k))
        n = wgmma_int8._instr_n(block_m, block_n, warps)
        assert n in wgmma_int8.INT8_WGMMA_N and block_n % n == 0
        along_m, along_n = wgmma_int8._warps_per_cta(block_m, warps)
        assert along_m * along_n == warps and block_m % (16 * along_m) == 0
    assert wgmma_int8._instr_n(128, 256, 8) == 128  # 256 is not an int8 wgmma width
    assert wgmma_int8.DEFAULT_WGMMA_CONFIG in too_big_for_fp32 and len(too_big_for_fp32) < len(wgmma_int8.WGMMA_CONFIGS)
    if not torch.cuda.is_available():
        assert not wgmma_int8.available() and wgmma_int8.unavailable_reason()


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("prefetch_scales", [True, False])
def test_gpu_wgmma_gemm_every_config_matches_pointer_gemm(prefetch_scales, monkeypatch):
    """The Gluon kernels (single-partition and warp-specialized) at each of their configurations, with the
    scales prefetched into shared memory or loaded in the epilogue, on shapes with ragged M and N, K shorter
    than the prefetch distance and K not a multiple of BLOCK_K, and more tiles than SMs (persistent loop,
    barrier phases over several passes of the ring)."""
    from turbodiffusion_core.quant import wgmma_int8

    monkeypatch.setattr(wgmma_int8, "PREFETCH_SCALES", prefetch_scales)

    if not wgmma_int8.available():
        pytest.skip(wgmma_int8.unavailable_reason())
    for rows, inner, cols in ((1037, 1536, 1032), (300, 80, 264), (4099, 272, 2056)):
        x = activations(rows, inner, device="cuda", seed=int(torch.randint(0, 2**31, ())))
        weight, bias = weights(cols, inner, device="cuda")
        q_weight, w_scale = quantize_int8_rowwise(weight)
        q_act, a_scale = rk.quantize_rows_int8(x)
        pointer = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias, kernel="pointer")
        for config in wgmma_int8.WGMMA_CONFIGS:
            for with_bias in (bias, None):
                out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
                wgmma_int8.wgmma_int8_matmul(q_act, a_scale, q_weight, w_scale, with_bias, out, config)
                want = pointer if with_bias is not None else rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale,
                                                                                    None, kernel="pointer")
                err = rel_err(out, want)
                print((rows, inner, cols), config, with_bias is not None, err)
                assert err < 1e-6, (rows, inner, cols, config)


@on_gpu
@pytest.mark.gpu
def test_gpu_wgmma_tuner_keeps_warm_up_short(monkeypatch):
    """pick_config, with its cache emptied and its launches recorded: a GEMM of one wave of tiles launches only
    the first configuration; a large one launches the warp-specialized configurations and no single-partition
    one, and picks one of them. A bias at an address that is not 16-byte aligned is copied, not failed on."""
    from turbodiffusion_core.quant import wgmma_int8

    if not wgmma_int8.available():
        pytest.skip(wgmma_int8.unavailable_reason())
    monkeypatch.setattr(wgmma_int8, "_chosen", {})
    launched = []
    launch = wgmma_int8._launch

    def recording_launch(*args):
        launched.append(args[-1])
        return launch(*args)

    monkeypatch.setattr(wgmma_int8, "_launch", recording_launch)
    for rows, inner, cols in ((512, 1536, 1536), (8192, 1536, 4096)):
        launched.clear()
        q_act = torch.randint(-127, 128, (rows, inner), device="cuda", dtype=torch.int8)
        q_weight = torch.randint(-127, 128, (cols, inner), device="cuda", dtype=torch.int8)
        a_scale, w_scale = torch.rand(rows, device="cuda"), torch.rand(cols, device="cuda")
        out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
        config = wgmma_int8.pick_config(q_act, a_scale, q_weight, w_scale, None, out)
        tried = sorted(set(launched))
        print((rows, inner, cols), config, tried)
        specialized = [c for c in wgmma_int8.fitting_configs(out) if c[6]]
        if rows == 512:
            assert tried == [config] == [wgmma_int8.fitting_configs(out)[0]]
        else:
            assert tried == sorted(specialized) and config in specialized
    bias_storage = torch.randn(cols + 1, device="cuda").to(torch.bfloat16)
    bias = bias_storage[1:]  # 2-byte offset
    got = wgmma_int8.wgmma_int8_matmul(q_act, a_scale, q_weight, w_scale, bias, torch.empty_like(out))
    want = rk.int8_rowcol_matmul(q_act, a_scale, q_weight, w_scale, bias.clone(), kernel="pointer")
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("config_index", [0, 3, 4])
def test_wgmma_kernel_compiles_for_hopper_with_the_installed_triton(config_index, ragged):
    """No GPU needed: Triton compiles the Gluon kernel for sm_90 (its wheel brings ptxas). Catches Gluon API
    drift between Triton versions (3.9 renamed the TMA copies), and checks the point of the kernel: the PTX
    keeps one wgmma group in flight (`wgmma.wait_group 1`) and moves tiles by TMA; the warp-specialized one
    moves registers from the loader warp to the MMA warps and hands stages back by mbarrier arrivals.
    `ragged`: M, N, K without Triton's divisible-by-16 specialization (N = 1032, say), where the bf16 bias
    prefetch once asked for 2-byte cp.async copies and failed to lower."""
    from turbodiffusion_core.quant import wgmma_int8

    from turbodiffusion_core.kernels.triton_support import interpreting

    if wgmma_int8.gluon is None:
        pytest.skip(wgmma_int8.unavailable_reason())
    if interpreting():  # Triton decorated the kernel for its interpreter in this process: nothing to compile
        pytest.skip("compiles in the normal process; this one runs Triton's interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    config = wgmma_int8.WGMMA_CONFIGS[config_index]
    block_m, block_n, block_k, warps, buffers, _, specialized = config
    inner = 1536
    a = torch.empty(256, inner, dtype=torch.int8)
    c = torch.empty(256, 256, dtype=torch.bfloat16)
    scale = torch.empty(256, dtype=torch.float32)
    args = dict(a_desc=wgmma_int8._descriptor(a, [block_m, block_k]), w_desc=wgmma_int8._descriptor(a, [block_n, block_k]),
                c_desc=wgmma_int8._descriptor(c, [block_m, block_n]), a_scale_ptr=scale, w_scale_ptr=scale,
                bias_ptr=torch.empty(256, dtype=torch.bfloat16), M=32760, N=8960, K=inner)
    signature = {name: mangle_type(value) for name, value in args.items()}
    warps_m, warps_n = wgmma_int8._warps_per_cta(block_m, warps)
    constants = dict(HAS_BIAS=True, GROUP_M=8, NUM_BUFFERS=buffers, WARPS_M=warps_m, WARPS_N=warps_n,
                     INSTR_N=wgmma_int8._instr_n(block_m, block_n, warps), PREFETCH=True,
                     SPECIALIZED=bool(specialized), num_warps=warps)
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    source = GluonASTSource(wgmma_int8._int8_gemm_wgmma_kernel, signature,
                            constexprs={(names.index(k),): v for k, v in constants.items()},
                            attrs={(i,): [["tt.divisibility", 16]] for i in range(3, 6 if ragged else 9)})
    options = {"num_warps": warps, "maxnreg": wgmma_int8.max_registers(warps, specialized)}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".s8.s8" in ptx
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # asynchronous across K steps
    assert "cp.async.bulk.tensor" in ptx  # TMA loads and store
    assert "cp.async.cg.shared.global" in ptx or "cp.async.ca.shared.global" in ptx  # scales prefetched
    assert compiled.metadata.shared <= wgmma_int8.shared_memory_bytes(config, 2)
    if specialized:
        assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx and "setmaxnreg.inc" in ptx
        # a stage goes back to the loader by one thread's arrival (barrier count 1): a barrier of all the MMA
        # warps must come first, or warpgroup 0 could release a stage warpgroup 1's wgmma still reads
        lines = [line.strip() for line in ptx.splitlines() if line.strip() and not line.strip().startswith(".loc")]
        arrivals = [i for i, line in enumerate(lines) if "mbarrier.arrive.shared" in line]
        assert arrivals
        for i in arrivals:
            assert any(re.match(rf"(bar|barrier)\.sync\s+\d+,\s*{warps * 32};", line) for line in lines[i - 6:i]), \
                lines[i - 6:i + 1]
