"""The Triton quantizers and int8 tile GEMM against the quantized linears' PyTorch references.

CPU: `test_cpu_kernels_in_interpreter` reruns the kernel test files in one fresh process under Triton's interpreter
(TRITON_INTERPRET must be set before triton is first imported); there the `on_cpu` tests run the kernels
on small ragged shapes. The FP8 GEMM itself is torch._scaled_mm, which also runs on the CPU.
GPU (`on_gpu`, skipped without CUDA): the same checks at a realistic width on fresh inputs.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernel_support import check_interpreter_run, on_cpu, on_gpu, rel_err  # noqa: E402

from turbodiffusion_core.quant import kernels as qk  # noqa: E402
from turbodiffusion_core.quant.fp8 import Fp8Linear, dequantize_fp8_rowwise, quantize_fp8_rowwise  # noqa: E402
from turbodiffusion_core.quant.tile_int8 import TileInt8Linear, quantize_tile_int8, w8a8_tile_reference  # noqa: E402

def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)



def activations(
    rows: int, cols: int, device: str = "cpu", dtype=torch.bfloat16, seed: int = 0, outlier: bool = True
) -> torch.Tensor:
    """Gaussian rows with the awkward cases planted: an all-zero row, a tiny row, one large outlier.

    (An outlier ruins its whole 128x128 tile under tile quantization, so tests that compare with the
    unquantized linear leave it out.)
    """
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, device=device) * 3
    x[1] = 0.0
    x[2] *= 1e-5
    if outlier:
        x[3, 7] = 900.0
    return x.to(dtype)


def linear_weights(out_features: int, in_features: int, device: str = "cpu", seed: int = 1):
    gen = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen, device=device) * 0.05
    bias = torch.randn(out_features, generator=gen, device=device) * 0.1
    return weight, bias.to(torch.bfloat16)


@on_cpu
def test_fp8_row_quantizer_matches_reference_exactly():
    x = activations(37, 200).view(1, 37, 200)  # leading dims are flattened, K not a power of two
    q, scale = qk.quantize_rows_fp8(x)
    ref_q, ref_scale = quantize_fp8_rowwise(x.view(37, 200))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (37, 200) and scale.shape == (37, 1)
    assert torch.equal(scale.view(-1), ref_scale)
    assert torch.equal(q.float(), ref_q.float())  # value equality (an underflowing -0 may be stored as +0)


@on_cpu
def test_every_fp8_row_quantizer_config_matches_the_reference(monkeypatch):
    """The interpreter launches the autotuned quantizer with its first config; here each in turn: rows
    wider than BLOCK_K (the chunked two-read path) and narrower (one read), with and without GELU."""
    x = activations(5, 2100, dtype=torch.float32)
    ref_q, ref_scale = quantize_fp8_rowwise(x)
    ref_gq, ref_gscale = quantize_fp8_rowwise(F.gelu(x, approximate="tanh"))
    for config in qk.FP8_ROWQUANT_CONFIGS:
        monkeypatch.setattr(qk._fp8_rowquant_kernel, "config", config)
        q, scale = qk.quantize_rows_fp8(x)
        assert torch.equal(scale.view(-1), ref_scale) and torch.equal(q.float(), ref_q.float()), config
        q, scale = qk.quantize_rows_fp8(x, act="gelu_tanh")
        assert torch.allclose(scale.view(-1), ref_gscale, rtol=1e-6, atol=0), config
        assert (q.float() == ref_gq.float()).float().mean() > 0.99, config


def gelu_awkward_rows(cols: int) -> torch.Tensor:
    """Rows whose GELU amax comes from the negative side (GELU's minimum, about -0.17 at -0.75), from values
    near that minimum on one side only, from the positive side, or from nothing (all zero)."""
    gen = torch.Generator().manual_seed(7)
    rows = [
        torch.rand(cols, generator=gen) * -3.0,  # all negative, both sides of the minimum
        torch.rand(cols, generator=gen) * -0.5,  # all in (-0.5, 0]: above the minimum only
        -1.0 - torch.rand(cols, generator=gen) * 4.0,  # all below the minimum only
        torch.randn(cols, generator=gen) * 0.1 - 0.7517915,  # around the minimum
        torch.rand(cols, generator=gen) * 0.2 - 1.0,  # negatives plus ...
        torch.randn(cols, generator=gen) * 3,  # ordinary rows
        torch.zeros(cols),
    ]
    rows[4][cols // 2] = 0.15  # ... one small positive value whose GELU is below the negative side's peak
    return torch.stack(rows)


@on_cpu
def test_gelu_amax_from_extremes_equals_the_amax_of_gelu(monkeypatch):
    """The chunked quantizers take GELU's row amax from three extremes of the raw values instead of GELU of
    every value: the same scales as quantizing GELU(x), for every config and for both quantizers."""
    from turbodiffusion_core.quant import rowcol_kernels as rk
    from turbodiffusion_core.quant.rowcol_int8 import quantize_int8_rowwise

    x = gelu_awkward_rows(2100)
    gelu = F.gelu(x, approximate="tanh")
    ref_q, ref_scale = quantize_fp8_rowwise(gelu)
    ref_iq, ref_iscale = quantize_int8_rowwise(gelu)
    for config in qk.FP8_ROWQUANT_CONFIGS:
        monkeypatch.setattr(qk._fp8_rowquant_kernel, "config", config)
        q, scale = qk.quantize_rows_fp8(x, act="gelu_tanh")
        assert torch.allclose(scale.view(-1), ref_scale, rtol=1e-6, atol=0), config
        assert (q.float() == ref_q.float()).float().mean() > 0.99, config
    for config in rk.ROWQUANT_CONFIGS:
        monkeypatch.setattr(rk._int8_rowquant_kernel, "config", config)
        q, scale = rk.quantize_rows_int8(x, act="gelu_tanh")
        assert torch.allclose(scale.view(-1), ref_iscale.view(-1), rtol=1e-6, atol=0), config
        assert (q == ref_iq).float().mean() > 0.99, config


@on_cpu
def test_fp8_quantizer_with_fused_gelu():
    x = activations(16, 96, dtype=torch.float32)
    q, scale = qk.quantize_rows_fp8(x, act="gelu_tanh")
    ref_q, ref_scale = quantize_fp8_rowwise(F.gelu(x, approximate="tanh"))
    assert torch.allclose(scale.view(-1), ref_scale, rtol=1e-6, atol=0)
    same = (q.float() == ref_q.float()).float().mean()
    assert same > 0.99  # GELU's last-bit differences may flip a rounding now and then
    assert rel_err(dequantize_fp8_rowwise(q, scale.view(-1)), dequantize_fp8_rowwise(ref_q, ref_scale)) < 1e-3
    with pytest.raises(ValueError, match="activation"):
        qk.quantize_rows_fp8(x, act="relu")


@on_cpu
def test_fp8_linear_matches_w8a8_reference_and_stays_near_the_module():
    x = activations(40, 64, outlier=False).view(2, 20, 64)
    weight, bias = linear_weights(48, 64)
    module = Fp8Linear.from_linear(_linear(weight, bias))
    out = qk.fp8_linear(x, module.weight, module.weight_scale, module.bias)
    xq, xs = quantize_fp8_rowwise(x.view(40, 64))
    w8a8 = dequantize_fp8_rowwise(xq, xs) @ dequantize_fp8_rowwise(module.weight, module.weight_scale).t()
    assert out.shape == (2, 20, 48) and out.dtype == torch.bfloat16
    assert rel_err(out.view(40, 48), w8a8 + bias.float()) < 1e-2
    # Fp8Linear's own forward is weight-only; the activation rounding is the whole difference.
    assert rel_err(out, module(x)) < 5e-2


@on_cpu
@pytest.mark.parametrize("rows, cols", [(200, 320), (64, 128), (130, 64)])
def test_int8_tile_quantizer_matches_reference_exactly(rows, cols):
    x = activations(rows, cols)
    q, scale = qk.quantize_tiles_int8(x)
    ref_q, ref_scale = quantize_tile_int8(x)
    assert q.dtype == torch.int8 and scale.shape == ref_scale.shape
    assert torch.equal(q, ref_q)
    assert torch.equal(scale, ref_scale)


@on_cpu
@pytest.mark.parametrize("rows, inner, outer", [(200, 256, 192), (70, 64, 48), (130, 320, 200)])
def test_int8_tile_gemm_matches_reference(rows, inner, outer):
    """Ragged M and N, K a multiple of 128 or not (the tiny model's 64), against the exact W8A8 math."""
    x = activations(rows, inner, dtype=torch.float32)
    weight, bias = linear_weights(outer, inner)
    q_weight, w_scale = quantize_tile_int8(weight)
    q_act, a_scale = qk.quantize_tiles_int8(x)
    out = qk.int8_tile_matmul(q_act, a_scale, q_weight, w_scale, bias, out_dtype=torch.float32)
    ref = w8a8_tile_reference(x, q_weight, w_scale, bias)
    assert rel_err(out, ref) < 1e-6


@on_cpu
def test_int8_tile_linear_is_a_drop_in_for_the_module(monkeypatch):
    monkeypatch.setenv("TD_INT8_KERNEL", "tile")  # else the module holds the per-channel layout here
    x = activations(96, 256, dtype=torch.float16, outlier=False).view(3, 32, 256)
    weight, bias = linear_weights(128, 256)
    module = TileInt8Linear.from_linear(_linear(weight, bias))
    out = qk.int8_tile_linear(x, module.int8_weight, module.scale, module.bias)
    assert not module.per_channel and out.shape == (3, 32, 128) and out.dtype == torch.float16
    assert rel_err(out, module(x)) < 2e-3
    assert rel_err(out, F.linear(x.float(), weight, bias.float())) < 5e-2


def test_fp8_fast_accumulation_is_the_default(monkeypatch):
    monkeypatch.delenv("TD_FP8_EXACT_ACCUM", raising=False)
    assert qk.fp8_fast_accum_default()
    monkeypatch.setenv("TD_FP8_EXACT_ACCUM", "1")
    assert not qk.fp8_fast_accum_default()
    monkeypatch.setenv("TD_FP8_EXACT_ACCUM", "0")
    assert qk.fp8_fast_accum_default()


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


@on_gpu
@pytest.mark.gpu
def test_gpu_quantized_linears_match_references():
    x = activations(1000, 1536, device="cuda", outlier=False)
    weight, bias = linear_weights(1024, 1536, device="cuda")
    dense = F.linear(x.float(), weight, bias.float())

    wq, ws = quantize_fp8_rowwise(weight)
    xq, xs = qk.quantize_rows_fp8(x)
    ref_q, ref_s = quantize_fp8_rowwise(x)
    fp8_mismatch = float((xq.float() != ref_q.float()).float().mean())
    out = qk.fp8_linear(x, wq, ws, bias)
    w8a8 = dequantize_fp8_rowwise(ref_q, ref_s) @ dequantize_fp8_rowwise(wq, ws).t() + bias.float()

    q_weight, w_scale = quantize_tile_int8(weight)
    aq, a_scale = qk.quantize_tiles_int8(x)
    int8_mismatch = float((aq != quantize_tile_int8(x)[0]).float().mean())
    out8 = qk.int8_tile_linear(x, q_weight, w_scale, bias)
    ref8 = w8a8_tile_reference(x, q_weight, w_scale, bias)

    errs = dict(fp8=rel_err(out, w8a8), fp8_vs_bf16=rel_err(out, dense), int8=rel_err(out8, ref8),
                int8_vs_bf16=rel_err(out8, dense), fp8_mismatch=fp8_mismatch, int8_mismatch=int8_mismatch)
    print("quantized linears:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert fp8_mismatch < 1e-3 and int8_mismatch < 1e-3
    assert errs["fp8"] < 1e-2 and errs["int8"] < 1e-2
    assert errs["fp8_vs_bf16"] < 6e-2 and errs["int8_vs_bf16"] < 6e-2
