"""The Triton SLA kernels against the pure-PyTorch SLA reference.

CPU: `test_cpu_kernels_in_interpreter` reruns the kernel test files in one fresh process under Triton's interpreter
(TRITON_INTERPRET must be set before triton is first imported, so it gets a process of its own and
cannot leak into other tests); there the `on_cpu` tests run the kernels on tiny shapes, in float16
because the interpreter's bf16 matmul is not faithful (it multiplies the raw bf16 bit patterns).
GPU (`on_gpu`, skipped without CUDA): bf16 at a few thousand tokens on fresh inputs, against the reference.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernel_support import check_interpreter_run, on_cpu, on_gpu, qkv, random_proj, rel_err  # noqa: E402

from turbodiffusion_core.attention import sla_triton as sla  # noqa: E402
from turbodiffusion_core.attention.sla_reference import (  # noqa: E402
    sla_block_map,
    sla_linear_branch,
    sla_reference,
    sla_sparse_branch,
)

def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)


@on_cpu
@pytest.mark.parametrize("length, topk", [(300, 0.5), (256, 0.25), (200, 1.0)])
def test_block_map_matches_reference(length, topk):
    q, k, v = qkv(2, length, 2, 32)
    prep = sla.sla_prepare(q, k, v, topk, with_linear=False)
    ref = sla_block_map(q.transpose(1, 2), k.transpose(1, 2), topk).sort(dim=-1).values
    assert prep.kv is None
    assert torch.equal(prep.lut.view(ref.shape).long(), ref)
    assert torch.all(prep.lut[..., 1:] > prep.lut[..., :-1])  # sorted, distinct


@on_cpu
@pytest.mark.parametrize("keep", [1, 64, 200])
def test_fused_select_equals_topk_then_sort(keep):
    """Continuous random scores (no ties): the kernel keeps exactly torch.topk's blocks, ascending."""
    scores = torch.randn(2, 9, 200, generator=torch.Generator().manual_seed(keep))  # 18 rows: two programs
    fused = sla.select_blocks(scores, keep, "fused")
    torch_lut = sla.select_blocks(scores, keep, "torch")
    assert fused.dtype == torch.int32 and fused.shape == (2, 9, keep)
    assert torch.equal(fused, torch_lut)


@on_cpu
def test_fused_select_with_ties_keeps_exactly_k_of_the_largest():
    scores = torch.randint(0, 5, (2, 8, 100), generator=torch.Generator().manual_seed(0)).float()  # many ties
    keep = 30
    fused = sla.select_blocks(scores, keep, "fused").long()
    assert torch.all(fused[..., 1:] > fused[..., :-1])  # ascending, distinct
    kept_scores = scores.gather(-1, fused).sort(dim=-1).values
    best = scores.topk(keep, dim=-1).values.sort(dim=-1).values
    assert torch.equal(kept_scores, best)  # the same scores as torch.topk keeps (ties broken by index)


@on_cpu
def test_fused_select_orders_signs_zeros_and_infinities():
    """The radix select's float-to-key map: negatives below zeros below positives, huge and infinite values."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 5, 64, generator=gen) * torch.tensor([1e-30, 1.0, 1e30]).repeat_interleave(5).view(3, 5, 1)
    scores[0, 0, :8] = float("-inf")
    scores[1, 1, 5] = float("inf")
    scores[2, 2, 10:20] = 0.0
    for keep in (1, 7, 40, 64):
        fused = sla.select_blocks(scores, keep, "fused").long()
        kept_scores = scores.gather(-1, fused).sort(dim=-1).values
        best = scores.topk(keep, dim=-1).values.sort(dim=-1).values
        assert torch.equal(kept_scores, best), keep
        assert torch.all(fused[..., 1:] > fused[..., :-1])


@on_cpu
def test_block_map_with_the_fused_select(monkeypatch):
    monkeypatch.setenv("TD_SLA_SELECT", "fused")
    q, k, v = qkv(2, 300, 2, 32)
    prep = sla.sla_prepare(q, k, v, 0.5, with_linear=False)
    ref = sla_block_map(q.transpose(1, 2), k.transpose(1, 2), 0.5).sort(dim=-1).values
    assert torch.equal(prep.lut.view(ref.shape).long(), ref)
    monkeypatch.setenv("TD_SLA_SELECT", "radix")
    with pytest.raises(ValueError, match="TD_SLA_SELECT"):
        sla.sla_prepare(q, k, v, 0.5, with_linear=False)


@on_cpu
def test_linear_state_matches_direct_formula():
    q, k, v = qkv(1, 200, 2, 32)
    prep = sla.sla_prepare(q, k, v, 0.5, with_linear=True)
    phi_k = k.float().transpose(1, 2).softmax(dim=-1)  # [B, H, L, D]
    kv_ref = phi_k.transpose(-1, -2) @ v.float().transpose(1, 2)
    assert rel_err(prep.kv.view(kv_ref.shape), kv_ref) < 2e-3
    assert rel_err(prep.ksum.view(1, 2, 32), phi_k.sum(dim=2)) < 1e-5


@on_cpu
@pytest.mark.parametrize("length", [300, 256])
def test_sparse_kernel_matches_reference_on_same_block_map(length):
    q, k, v = qkv(1, length, 2, 32)
    prep = sla.sla_prepare(q, k, v, 0.5, with_linear=False)
    out = sla.sla_attend(q, k, v, prep)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ref = sla_sparse_branch(qh, kh, vh, prep.lut.view(1, 2, -1, prep.lut.shape[-1]).long()).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert rel_err(out, ref) < 2e-3


@on_cpu
@pytest.mark.parametrize("length, topk", [(300, 0.5), (256, 0.6), (200, 1.0)])
def test_every_attention_config_matches_reference(monkeypatch, length, topk):
    """The interpreter launches the autotuned kernel with its first config; here each in turn, among them
    the two-blocks-a-step ones, with even and odd kept-block counts and a partial last key block."""
    q, k, v = qkv(1, length, 2, 32)
    proj = random_proj(32)
    prep = sla.sla_prepare(q, k, v, topk, with_linear=True)
    ref = sla_reference(q, k, v, proj_l=proj, topk=topk)
    for config in sla.ATTN_CONFIGS:
        monkeypatch.setattr(sla._sla_attn_kernel, "config", config)
        out = sla.sla_attend(q, k, v, prep, proj.weight, proj.bias)
        assert rel_err(out, ref) < 2e-3, config


@on_cpu
def test_whole_op_with_proj_matches_reference():
    q, k, v = qkv(2, 200, 2, 32)
    proj = random_proj(32)
    out = sla.sla_triton(q, k, v, proj_l=proj, topk=0.5)
    ref = sla_reference(q, k, v, proj_l=proj, topk=0.5)
    assert rel_err(out, ref) < 2e-3
    # The linear branch is a real part of the result: dropping it is far off.
    assert rel_err(sla.sla_triton(q, k, v, topk=0.5), ref) > 0.05


@on_cpu
def test_topk_one_without_proj_is_dense_attention():
    q, k, v = qkv(1, 200, 2, 64)
    out = sla.sla_triton(q, k, v, topk=1.0)
    dense = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out, dense) < 2e-3


@on_cpu
def test_accepts_strided_views_of_a_fused_projection():
    """q, k, v as views into one [B, L, 3, H, D] tensor (a fused qkv projection) give the same result."""
    q, k, v = qkv(1, 200, 2, 32)
    fused = torch.stack([q, k, v], dim=2)
    proj = random_proj(32)
    out_views = sla.sla_triton(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2], proj_l=proj, topk=0.5)
    assert torch.equal(out_views, sla.sla_triton(q, k, v, proj_l=proj, topk=0.5))


@on_cpu
def test_rejects_unsupported_shapes():
    q, k, v = qkv(1, 64, 2, 48)
    with pytest.raises(ValueError, match="head_dim"):
        sla.sla_triton(q, k, v)
    with pytest.raises(ValueError, match="shape"):
        sla.sla_triton(q, k[:, :32], v)


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads, q_blocks, k_blocks, keep", [(12, 256, 512, 51), (40, 591, 1182, 118)])
def test_gpu_fused_select_equals_topk(heads, q_blocks, k_blocks, keep):
    """At the 480p 1.3B and 720p 14B map shapes, fresh random scores: the same blocks as torch.topk."""
    scores = torch.randn(heads, q_blocks, k_blocks, device="cuda")
    fused = sla.select_blocks(scores, keep, "fused")
    assert torch.equal(fused, sla.select_blocks(scores, keep, "torch"))


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("topk", [0.05, 0.1, 0.15])
def test_gpu_bf16_matches_reference(topk):
    q, k, v = qkv(1, 4096 + 57, 4, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    proj = random_proj(128, dtype=torch.bfloat16, device="cuda")
    out = sla.sla_triton(q, k, v, proj_l=proj, topk=topk)
    ref = sla_reference(q, k, v, proj_l=proj, topk=topk)
    prep = sla.sla_prepare(q, k, v, topk, with_linear=True)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    lut = prep.lut.view(1, 4, -1, prep.lut.shape[-1]).long()
    same_map = sla_sparse_branch(qh, kh, vh, lut) + F.linear(
        sla_linear_branch(qh, kh, vh), proj.weight.float(), proj.bias.float()
    )
    err, err_same_map = rel_err(out, ref), rel_err(out, same_map.transpose(1, 2))
    print(f"sla topk {topk}: rel err vs reference {err:.2e}, on the same block map {err_same_map:.2e}")
    assert err_same_map < 1e-2
    assert err < 1e-2
