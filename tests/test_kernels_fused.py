"""The fused elementwise kernels (residual + LayerNorm + modulation, q/k RMSNorm + RoPE) against PyTorch.

References: the unfused PyTorch expressions in the kernels' own modules, and for RoPE also the DiT's
own RMSNorm and `apply_rope`, so "drop-in" is checked against the model code itself.

CPU: `test_cpu_kernels_in_interpreter` reruns the kernel test files in one fresh process under Triton's interpreter
(TRITON_INTERPRET must be set before triton is first imported). Results are compared in float32 or
float16 there: the interpreter casts float32 to bf16 by truncation, not rounding (GPUs round).
GPU (`on_gpu`, skipped without CUDA): bf16 at a realistic width on fresh inputs.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from tests.kernel_support import check_interpreter_run, on_cpu, on_gpu, rel_err  # noqa: E402
from turbodiffusion_core.kernels.triton_support import kernels_usable  # noqa: E402

from turbodiffusion_core.kernels import norm, rope  # noqa: E402

def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)



def stream(batch: int, length: int, width: int, device: str = "cpu", seed: int = 0, per_token: bool = False):
    """Residual x (float32), branch output y, a [B, 6, C] modulation table (or per-token), affine LN weights."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, length, width, generator=gen, device=device) * 2 + 0.5
    y = torch.randn(batch, length, width, generator=gen, device=device)
    table = torch.randn(batch, length if per_token else 1, 6, width, generator=gen, device=device) * 0.5
    mods = [table[:, :, i] for i in range(6)]  # strided views, like the DiT's chunk()
    weight = torch.randn(width, generator=gen, device=device)
    bias = torch.randn(width, generator=gen, device=device)
    return x, y, mods, weight, bias


@on_cpu
def test_kernels_usable_follows_the_interpreter():
    assert kernels_usable(torch.zeros(1))


@on_cpu
@pytest.mark.parametrize(
    "case, per_token",
    [
        ("norm1_modulate", False),
        ("residual_gate_affine", False),
        ("residual_modulate", False),
        ("residual_modulate", True),
        ("residual_only", True),
    ],
)
def test_residual_layernorm_matches_unfused(case, per_token):
    x, y, (shift, scale, gate, *_), weight, bias = stream(2, 5, 96, per_token=per_token)
    kwargs = {
        "norm1_modulate": dict(y=None, shift=shift, scale=scale),
        "residual_gate_affine": dict(y=y.half(), gate=gate, weight=weight, bias=bias),
        "residual_modulate": dict(y=y, shift=shift, scale=scale),
        "residual_only": dict(y=y, gate=gate, norm=False),
    }[case]
    y_arg, gate_arg = kwargs.pop("y"), kwargs.pop("gate", None)
    x_new, h, h_scale = norm.residual_layernorm(x, y_arg, gate_arg, out_dtype=torch.float32, **kwargs)
    x_ref, h_ref, _ = norm.residual_layernorm_reference(x, y_arg, gate_arg, out_dtype=torch.float32, **kwargs)
    assert h_scale is None
    assert torch.allclose(x_new, x_ref, rtol=1e-6, atol=1e-6)
    if kwargs.get("norm", True):
        assert h.shape == x.shape and h.dtype == torch.float32
        assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    else:
        assert h is None


@on_cpu
def test_modulated_norm_in_bf16_and_fp8_outputs():
    x, y, (shift, scale, *_), _, _ = stream(1, 6, 128, seed=1)
    h = norm.layernorm_modulate(x, shift, scale)
    _, h_ref, _ = norm.residual_layernorm_reference(x, shift=shift, scale=scale, out_dtype=torch.float32)
    assert h.dtype == torch.bfloat16 and rel_err(h, h_ref) < 1e-2

    _, q, q_scale = norm.residual_layernorm(x, y, shift=shift, scale=scale, out_dtype=torch.float8_e4m3fn)
    _, ref_q, ref_scale = norm.residual_layernorm_reference(
        x, y, shift=shift, scale=scale, out_dtype=torch.float8_e4m3fn
    )
    assert q.dtype == torch.float8_e4m3fn and q_scale.shape == (6, 1)
    assert torch.allclose(q_scale, ref_scale, rtol=1e-5)
    assert (q.float() == ref_q.float()).float().mean() > 0.99


@on_cpu
@pytest.mark.parametrize("case", ["modulate", "affine"])
def test_int8_norm_output_equals_the_rowcol_quantizer(case):
    """int8 rows + scales from the norm: `quantize_int8_rowwise` of the float32 output, bit for bit where the
    float32 norm values agree (a value within rounding of a .5 step may round the other way)."""
    x, y, (shift, scale, gate, *_), weight, bias = stream(2, 7, 96, seed=9)
    kwargs = dict(shift=shift, scale=scale) if case == "modulate" else dict(gate=gate, weight=weight, bias=bias)
    _, q, q_scale = norm.residual_layernorm(x, y, out_dtype=torch.int8, **kwargs)
    _, ref_q, ref_scale = norm.residual_layernorm_reference(x, y, out_dtype=torch.int8, **kwargs)
    assert q.dtype == torch.int8 and q.shape == x.shape and q_scale.shape == (14, 1)
    assert torch.allclose(q_scale, ref_scale, rtol=1e-6)
    assert (q != ref_q).float().mean() < 0.01 and (q.int() - ref_q.int()).abs().max() <= 1
    assert q.abs().amax(dim=-1).eq(127).all()  # each row's largest value maps to 127 exactly


@on_cpu
def test_fp8_norm_output_feeds_the_fp8_gemm():
    """residual_layernorm's float8 rows and scales are `fp8_matmul`'s input format (no requantization)."""
    from turbodiffusion_core.quant.fp8 import dequantize_fp8_rowwise, quantize_fp8_rowwise
    from turbodiffusion_core.quant.kernels import fp8_matmul

    x, y, (shift, scale, *_), _, _ = stream(2, 4, 64, seed=5)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(6)) * 0.1
    wq, ws = quantize_fp8_rowwise(weight)
    _, h, h_scale = norm.residual_layernorm(x, y, shift=shift, scale=scale, out_dtype=torch.float8_e4m3fn)
    out = fp8_matmul(h, h_scale, wq, ws)
    _, h_ref, _ = norm.residual_layernorm_reference(x, y, shift=shift, scale=scale, out_dtype=torch.float32)
    hq, hs = quantize_fp8_rowwise(h_ref.reshape(8, 64))
    ref = dequantize_fp8_rowwise(hq, hs) @ dequantize_fp8_rowwise(wq, ws).t()
    assert out.shape == (2, 4, 32) and out.dtype == torch.bfloat16
    assert rel_err(out.reshape(8, 32), ref) < 1e-2


@on_cpu
def test_gated_residual_in_place():
    x, y, (_, _, gate, *_), _, _ = stream(2, 4, 64, seed=2)
    expected = torch.addcmul(x, y, gate)
    out = norm.gated_residual(x, y, gate, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    assert torch.allclose(x, expected, rtol=1e-6, atol=1e-6)


@on_cpu
def test_residual_layernorm_rejects_bad_arguments():
    x, y, (shift, scale, *_), _, _ = stream(1, 3, 32)
    with pytest.raises(ValueError, match="together"):
        norm.residual_layernorm(x, y, shift=shift)
    with pytest.raises(ValueError, match="modulation"):
        norm.residual_layernorm(x, y, shift=shift[:, :, :16], scale=scale[:, :, :16])


@on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_rope_matches_the_dit(dtype):
    from turbodiffusion_core.models import dit
    from turbodiffusion_core.models.configs import DIT_CONFIGS

    cfg = DIT_CONFIGS["tiny-t2v"]
    grid = (2, 3, 4)
    length, width = 24, cfg.dim
    rotations = dit.rope_tables(cfg, grid, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, length, width, generator=gen).to(dtype) for _ in range(2))
    norm_q, norm_k = dit.RMSNorm(width, cfg.eps), dit.RMSNorm(width, cfg.eps)
    with torch.no_grad():
        norm_q.weight.normal_(1.0, 0.3, generator=gen)
        norm_k.weight.normal_(1.0, 0.3, generator=gen)
    heads = (2, length, cfg.num_heads, cfg.head_dim)

    q_out, k_out = rope.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, rotations, num_heads=cfg.num_heads)
    q_ref, k_ref = rope.qk_norm_rope_reference(q, k, norm_q.weight, norm_k.weight, rotations, num_heads=cfg.num_heads)
    with torch.no_grad():
        q_dit = dit.apply_rope(norm_q(q).view(heads), rotations)
        k_dit = dit.apply_rope(norm_k(k).view(heads), rotations)
    assert q_out.shape == heads and q_out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for out, ref, model in ((q_out, q_ref, q_dit), (k_out, k_ref, k_dit)):
        assert torch.allclose(out.float(), ref.float(), **tol)
        assert torch.allclose(out.float(), model.float(), **tol)


@on_cpu
def test_qk_norm_rope_in_place_on_head_layout():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 8, 2, 32, generator=gen) for _ in range(2))
    angles = torch.rand(8, 1, 16, generator=gen) * 6.3
    rotations = torch.polar(torch.ones_like(angles), angles)
    weight = torch.rand(64, generator=gen) + 0.5
    q_ref, k_ref = rope.qk_norm_rope_reference(q, k, weight, weight, rotations)
    q_out, k_out = rope.qk_norm_rope(q, k, weight, weight, rotations, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.allclose(q, q_ref, rtol=1e-5, atol=1e-5) and torch.allclose(k, k_ref, rtol=1e-5, atol=1e-5)


@on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_rows_matches_the_dit_norm(dtype):
    """The cross-attention's q norm: the kernel against the DiT's own RMSNorm module, out of place on a
    [B, L, C] tensor and in place on the rows of a wider buffer (a column slice: strided rows)."""
    from turbodiffusion_core.models import dit

    gen = torch.Generator().manual_seed(6)
    norm_q = dit.RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm_q.weight.normal_(1.0, 0.3, generator=gen)
        x = torch.randn(2, 9, 96, generator=gen).to(dtype) * 3
        out = rope.rms_norm_rows(x, norm_q.weight, eps=1e-6)
        ref = norm_q(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    assert out.shape == x.shape and out.dtype == dtype and out.data_ptr() != x.data_ptr()
    assert torch.allclose(out.float(), ref.float(), **tol)
    wide = torch.randn(18, 160, generator=gen).to(dtype)
    rows = wide[:, 32:128]
    with torch.no_grad():
        ref = norm_q(rows.clone())
        got = rope.rms_norm_rows(rows, norm_q.weight, eps=1e-6, inplace=True)
    assert torch.allclose(got.float(), ref.float(), **tol)


@on_gpu
@pytest.mark.gpu
def test_gpu_fused_kernels_match_references():
    x, y, (shift, scale, gate, *_), weight, bias = stream(1, 2000, 1536, device="cuda")
    y = y.to(torch.bfloat16)
    errs = {}
    x_new, h, _ = norm.residual_layernorm(x, y, gate, weight=weight, bias=bias)
    x_ref, h_ref, _ = norm.residual_layernorm_reference(x, y, gate, weight=weight, bias=bias)
    errs["residual+norm3"] = max(rel_err(x_new, x_ref), rel_err(h, h_ref))
    h = norm.layernorm_modulate(x, shift, scale)
    errs["norm1+modulate"] = rel_err(h, norm.residual_layernorm_reference(x, shift=shift, scale=scale)[1])
    q, k = (torch.randn(1, 2000, 1536, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    angles = torch.rand(2000, 1, 64, device="cuda") * 6.3
    rotations = torch.polar(torch.ones_like(angles), angles)
    wq, wk = torch.rand(1536, device="cuda") + 0.5, torch.rand(1536, device="cuda") + 0.5
    q_out, k_out = rope.qk_norm_rope(q, k, wq, wk, rotations, num_heads=12)
    q_ref, k_ref = rope.qk_norm_rope_reference(q, k, wq, wk, rotations, num_heads=12)
    errs["qk_norm_rope"] = max(rel_err(q_out, q_ref), rel_err(k_out, k_ref))
    q_ref = torch.nn.functional.rms_norm(q.float(), (1536,), wq, 1e-6).to(q.dtype)
    errs["rms_norm_rows"] = rel_err(rope.rms_norm_rows(q, wq, eps=1e-6), q_ref)
    print("fused kernels rel err:", {name: f"{err:.2e}" for name, err in errs.items()})
    assert all(err < 1e-2 for err in errs.values())


@on_gpu
@pytest.mark.gpu
def test_gpu_int8_norm_output_equals_the_rowcol_quantizer():
    """At the 1.3B width on the GPU, fresh inputs: int8 rows and scales as quantize_int8_rowwise makes them."""
    seed = int(torch.randint(0, 2**31, ()))
    x, y, (shift, scale, gate, *_), weight, bias = stream(2, 300, 1536, device="cuda", seed=seed)
    _, q, q_scale = norm.residual_layernorm(x, y, shift=shift, scale=scale, out_dtype=torch.int8)
    _, ref_q, ref_scale = norm.residual_layernorm_reference(x, y, shift=shift, scale=scale, out_dtype=torch.int8)
    mismatch = float((q != ref_q).float().mean())
    print(f"seed {seed}: int8 norm rows differing from the reference quantizer: {mismatch:.2e}")
    assert torch.allclose(q_scale, ref_scale, rtol=1e-5) and mismatch < 1e-3
    assert (q.int() - ref_q.int()).abs().max() <= 1
