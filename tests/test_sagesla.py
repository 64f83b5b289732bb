"""The `sagesla` backend (attention/sagesla.py): wiring, errors, and its parts against the SLA reference.

CPU, ordinary process: the clear errors when sagesla is asked for without a GPU or without spas_sage_attn,
the lookup once it is there, and SpargeAttn's delta-encoded LUT.
CPU, Triton interpreter (`on_cpu`, run in a process of this file's own by `test_cpu_parts_in_interpreter`):
the block map at SpargeAttn's block sizes, the linear-branch epilogue on its own, and the whole backend with
SpargeAttn's kernel replaced by an exact sparse branch that reads the LUT the way the kernel does.
GPU (`gpu`, skipped without CUDA or without spas_sage_attn): the real kernels against `sla_reference`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernel_support import on_cpu, qkv, random_proj, rel_err  # noqa: E402

from turbodiffusion_core.attention import AttentionUnavailable, get_backend, resolve_attention  # noqa: E402
from turbodiffusion_core.attention import sagesla as sg  # noqa: E402
from turbodiffusion_core.attention.sla_reference import (  # noqa: E402
    sla_block_map,
    sla_linear_branch,
    sla_reference,
    sla_sparse_branch,
)
from turbodiffusion_core.attention.sla_triton import sla_add_linear, sla_prepare  # noqa: E402
from turbodiffusion_core.kernels.triton_support import interpreting, pytest_under_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()
BLOCKS = [sg.HOPPER_BLOCKS, sg.MMA_BLOCKS]
real_find_spec = importlib.util.find_spec


def spas_installed(monkeypatch, installed: bool, load_error=None) -> None:
    """Pretend spas_sage_attn is (not) installed, and loads (or fails with load_error)."""
    fake_spec = real_find_spec("torch")

    def find_spec(name, *args, **kwargs):
        if name == "spas_sage_attn":
            return fake_spec if installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(sg, "spas_import_error", lambda: load_error)


# ------------------------------------------------------------------------------ CPU: errors and lookup


def test_cpu_parts_in_interpreter():
    """This file's `on_cpu` tests, run in a Triton-interpreter process of their own (tests/kernel_support.py)."""
    if interpreting():
        pytest.skip("this is the interpreter process")
    report = pytest_under_interpreter((THIS_FILE,), str(ROOT))
    assert f"PASSED {THIS_FILE}::test_sagesla_with_an_exact_sparse_kernel_is_the_reference" in report, report[-6000:]
    assert f"FAILED {THIS_FILE}" not in report and f"ERROR {THIS_FILE}" not in report, report[-6000:]


def test_sagesla_on_cpu_names_the_fix():
    with pytest.raises(AttentionUnavailable, match="CUDA GPU") as info:
        get_backend("sagesla", device_type="cpu")
    assert "SpargeAttn" in str(info.value) and "attention_type=sla" in str(info.value)


def test_sagesla_without_the_package_names_the_fix(monkeypatch):
    spas_installed(monkeypatch, installed=False)
    with pytest.raises(AttentionUnavailable, match="needs the spas_sage_attn package") as info:
        get_backend("sagesla", device_type="cuda")
    assert "pip install" in str(info.value) and "attention_type=sla" in str(info.value)


def test_sagesla_with_a_broken_build_says_why(monkeypatch):
    spas_installed(monkeypatch, installed=True, load_error="ImportError: undefined symbol: _ZN3c10")
    with pytest.raises(AttentionUnavailable, match="fails to load .*undefined symbol") as info:
        get_backend("sagesla", device_type="cuda")
    assert "attention_type=sla" in str(info.value)


def test_sagesla_is_the_backend_once_the_package_loads(monkeypatch):
    spas_installed(monkeypatch, installed=True)
    assert get_backend("sagesla", device_type="cuda") is sg.sagesla
    # auto takes it too (measured faster), through the wrapper that keeps sla for shapes it cannot take
    assert resolve_attention("auto", device_type="cuda", has_sla_proj=True) == "sagesla"
    assert get_backend("auto", device_type="cuda", has_sla_proj=True) is sg.sagesla_or_sla
    assert resolve_attention("auto", device_type="cuda", has_sla_proj=False) == "original"
    assert resolve_attention("auto", device_type="cpu", has_sla_proj=True) == "original"


@pytest.mark.parametrize("installed, load_error", [(False, None), (True, "ImportError: undefined symbol")])
def test_auto_is_sla_where_sagesla_cannot_load(monkeypatch, installed, load_error):
    spas_installed(monkeypatch, installed=installed, load_error=load_error)
    assert resolve_attention("auto", device_type="cuda", has_sla_proj=True) == "sla"


def test_sagesla_takes_only_what_its_kernels_can():
    q, _, _ = qkv(1, 256, 2, 64)
    assert not sg.sagesla_takes(q)  # on the CPU never
    assert not sg.sagesla_takes(q[..., :32]) and not sg.sagesla_takes(q[:, :100])


@pytest.mark.parametrize("blocks", BLOCKS)
def test_sagesla_rejects_what_the_kernels_cannot_take(blocks):
    q, k, v = qkv(1, 100, 2, 64)
    with pytest.raises(ValueError, match="at least 128 tokens"):
        sg.sagesla_attention(q, k, v, blocks=blocks)
    q, k, v = qkv(1, 256, 2, 32)
    with pytest.raises(ValueError, match="head_dim"):
        sg.sagesla_attention(q, k, v, blocks=blocks)
    with pytest.raises(ValueError, match="blocks"):
        sg.sagesla_attention(*qkv(1, 256, 2, 64), blocks=(64, 64))


def test_spas_lut_is_delta_encoded_and_padded():
    batch, heads, nq, nk, topk = 2, 3, 5, 9, 4
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(nk, generator=gen)[:topk].sort().values for _ in range(batch * heads * nq)])
    kept = kept.view(batch * heads, nq, topk).int()
    lut, valid = sg.spas_lut(kept, batch, heads, nk)
    assert lut.shape == (batch, heads, nq, nk) and lut.dtype == torch.int32 and lut.is_contiguous()
    assert valid.shape == (batch, heads, nq) and valid.dtype == torch.int32 and bool((valid == topk).all())
    # What the kernels do: start at lut[0], add lut[i] for each next block.
    assert torch.equal(lut[..., :topk].cumsum(dim=-1).view_as(kept), kept.long())
    assert bool((lut[..., topk:] == 0).all())


# --------------------------------------------------------------------------- CPU: Triton interpreter


def exact_spas_kernel(calls: list):
    """Stands in for SpargeAttn's kernel: decodes its LUT as the kernel does and attends exactly."""

    def sparse_branch(q, k, v, lut, valid, blocks, k_mean=None):
        batch, length, heads, _ = q.shape
        blkq, blkk = blocks
        nq, nk = math.ceil(length / blkq), math.ceil(length / blkk)
        assert lut.shape == (batch, heads, nq, nk) and lut.dtype == torch.int32
        assert valid.shape == (batch, heads, nq) and valid.dtype == torch.int32
        topk = int(valid.max())
        assert bool((valid == topk).all())
        kept = lut[..., :topk].long().cumsum(dim=-1)
        calls.append(blocks)
        assert k_mean is not None and k_mean.shape == (batch * heads, 1, q.shape[-1])  # the block map's
        torch.testing.assert_close(k_mean.view(batch, heads, -1), k.float().mean(dim=1), rtol=1e-4, atol=1e-5)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        return sla_sparse_branch(qh, kh, vh, kept, blkq, blkk).to(q.dtype).transpose(1, 2)  # [B, L, H, D]

    return sparse_branch


@on_cpu
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("length, topk", [(300, 0.5), (256, 0.25)])
def test_block_map_at_spas_block_sizes_matches_reference(blocks, length, topk):
    q, k, v = qkv(2, length, 2, 64)
    blkq, blkk = blocks
    prep = sla_prepare(q, k, v, topk, with_linear=False, blkq=blkq, blkk=blkk)
    ref = sla_block_map(q.transpose(1, 2), k.transpose(1, 2), topk, blkq, blkk).sort(dim=-1).values
    assert prep.lut.shape == (4, math.ceil(length / blkq), ref.shape[-1])
    assert torch.equal(prep.lut.view(ref.shape).long(), ref)


@on_cpu
def test_add_linear_is_the_linear_branch_through_proj():
    q, k, v = qkv(1, 200, 2, 64)
    proj = random_proj(64)
    prep = sla_prepare(q, k, v, 0.5, with_linear=True)
    base = torch.randn(1, 2, 200, 64).half()  # [B, H, L, D], handed over as a [B, L, H, D] view
    out = sla_add_linear(q, base.transpose(1, 2), prep, proj.weight, proj.bias)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    linear = F.linear(sla_linear_branch(qh, kh, vh), proj.weight.float(), proj.bias.float())
    expected = (base.float() + linear).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert rel_err(out, expected) < 2e-3
    assert rel_err(base.transpose(1, 2), expected) > 0.05  # the linear branch is a visible part of it


@on_cpu
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("with_proj", [True, False])
def test_sagesla_with_an_exact_sparse_kernel_is_the_reference(monkeypatch, blocks, with_proj):
    calls = []
    monkeypatch.setattr(sg, "spas_sparse_branch", exact_spas_kernel(calls))
    q, k, v = qkv(1, 300, 2, 64)
    proj = random_proj(64) if with_proj else None
    out = sg.sagesla_attention(q, k, v, proj_l=proj, topk=0.4, blocks=blocks)
    ref = sla_reference(q, k, v, proj_l=proj, topk=0.4, blkq=blocks[0], blkk=blocks[1])
    assert calls == [blocks]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 2e-3
    other = sg.MMA_BLOCKS if blocks == sg.HOPPER_BLOCKS else sg.HOPPER_BLOCKS
    other_ref = sla_reference(q, k, v, proj_l=proj, topk=0.4, blkq=other[0], blkk=other[1])
    assert rel_err(out, other_ref) > 1e-2  # the block sizes matter: the test can tell them apart


# ------------------------------------------------------------------------------------------------ GPU

spas_loads = torch.cuda.is_available() and importlib.util.find_spec("spas_sage_attn") is not None
on_gpu_with_spas = pytest.mark.skipif(
    interpreting() or not spas_loads, reason="needs a CUDA GPU and spas_sage_attn (SpargeAttn, built for this GPU)"
)


@on_gpu_with_spas
@pytest.mark.gpu
@pytest.mark.parametrize("blocks", ["native", sg.MMA_BLOCKS])
@pytest.mark.parametrize("topk", [0.05, 0.1, 0.15])
def test_gpu_sagesla_matches_reference(blocks, topk):
    assert sg.spas_import_error() is None, sg.spas_import_error()
    q, k, v = qkv(1, 4096 + 57, 4, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    proj = random_proj(128, dtype=torch.bfloat16, device="cuda")
    blocks = sg.native_blocks(q.device) if blocks == "native" else blocks
    blkq, blkk = blocks
    out = sg.sagesla_attention(q, k, v, proj_l=proj, topk=topk, blocks=blocks)
    ref = sla_reference(q, k, v, proj_l=proj, topk=topk, blkq=blkq, blkk=blkk)
    prep = sla_prepare(q, k, v, topk, with_linear=True, blkq=blkq, blkk=blkk)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    kept = prep.lut.view(1, 4, -1, prep.lut.shape[-1]).long()
    same_map = sla_sparse_branch(qh, kh, vh, kept, blkq, blkk) + F.linear(
        sla_linear_branch(qh, kh, vh), proj.weight.float(), proj.bias.float()
    )
    err, err_same_map = rel_err(out, ref), rel_err(out, same_map.transpose(1, 2))
    print(f"sagesla {blkq}x{blkk} topk {topk}: rel err vs reference {err:.2e}, same block map {err_same_map:.2e}")
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert err_same_map < 3e-2  # INT8 q/k and FP8 v
    assert err < 5e-2


@on_gpu_with_spas
@pytest.mark.gpu
def test_gpu_backend_runs_without_proj():
    attention = get_backend("sagesla", device_type="cuda")
    q, k, v = qkv(2, 1024 + 7, 2, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    out = attention(q, k, v, topk=0.2)
    blkq, blkk = sg.native_blocks(q.device)
    ref = sla_reference(q, k, v, topk=0.2, blkq=blkq, blkk=blkk)
    err = rel_err(out, ref)
    print(f"sagesla backend {blkq}x{blkk}, no proj_l, head_dim 64: rel err vs reference {err:.2e}")
    assert err < 5e-2


@on_gpu_with_spas
@pytest.mark.gpu
def test_gpu_auto_backend_is_sagesla_where_it_can_and_sla_elsewhere():
    from turbodiffusion_core.attention.sla_triton import sla_triton

    attention = get_backend("auto", device_type="cuda", has_sla_proj=True)
    q, k, v = qkv(1, 1024 + 7, 2, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    proj = random_proj(128, dtype=torch.bfloat16, device="cuda")
    out = attention(q, k, v, proj_l=proj, topk=0.2)
    assert torch.allclose(out, sg.sagesla_attention(q, k, v, proj_l=proj, topk=0.2), rtol=0, atol=1e-6)
    q, k, v = (x[..., :32].contiguous() for x in (q, k, v))  # a head size SpargeAttn has no kernel for
    proj = random_proj(32, dtype=torch.bfloat16, device="cuda")
    out = attention(q, k, v, proj_l=proj, topk=0.2)
    assert torch.allclose(out, sla_triton(q, k, v, proj_l=proj, topk=0.2), rtol=0, atol=1e-6)
