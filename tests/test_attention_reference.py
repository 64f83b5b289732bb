"""The pure-PyTorch SLA reference against brute-force per-query computations of the same formula
(reference/turbodiffusion.md §3.2), and the backend lookup."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from turbodiffusion_core.attention import AttentionUnavailable, get_backend, resolve_attention
from turbodiffusion_core.attention.sdpa import sdpa_attention
from turbodiffusion_core.attention.sla_reference import (
    sla_block_map,
    sla_linear_branch,
    sla_reference,
    sla_topk_count,
)


def qkv(batch: int, length: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, heads, dim, generator=gen) for _ in range(3))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def zero_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def test_topk_count_follows_sla_and_never_drops_to_zero() -> None:
    assert sla_topk_count(0.1, 512) == 51  # 480p, 81 frames
    assert sla_topk_count(0.1, 1182) == 118  # 720p
    assert sla_topk_count(1.0, 7) == 7
    assert sla_topk_count(0.1, 5) == 1  # SLA would keep 0 blocks (NaN); we keep one


def test_full_topk_with_zero_projection_equals_dense_attention() -> None:
    q, k, v = qkv(2, 300, 2, 32)  # 300 tokens: partial tail blocks for both block sizes
    dense = sdpa_attention(q, k, v)
    assert rel_err(sla_reference(q, k, v, topk=1.0, proj_l=zero_linear(32)), dense) < 1e-5
    assert rel_err(sla_reference(q, k, v, topk=1.0), dense) < 1e-5


def brute_force_block_map(q: torch.Tensor, k: torch.Tensor, ratio: float, blkq: int, blkk: int) -> list[list[set]]:
    """Per (head, query block) the set of kept key blocks, for batch 0, one block at a time."""
    length = q.shape[1]
    centred = k[0] - k[0].mean(dim=0, keepdim=True)
    nq, nk = math.ceil(length / blkq), math.ceil(length / blkk)
    kept = []
    for head in range(q.shape[2]):
        per_head = []
        key_means = [centred[j * blkk : (j + 1) * blkk, head].double().mean(dim=0) for j in range(nk)]
        for i in range(nq):
            query_mean = q[0, i * blkq : (i + 1) * blkq, head].double().mean(dim=0)
            scores = [float(query_mean @ km) for km in key_means]
            order = sorted(range(nk), key=lambda j: -scores[j])
            per_head.append(set(order[: sla_topk_count(ratio, nk)]))
        kept.append(per_head)
    return kept


def test_block_selection_matches_brute_force() -> None:
    q, k, _ = qkv(1, 200, 2, 16, seed=3)
    blkq, blkk, ratio = 32, 16, 0.3
    lut = sla_block_map(q.transpose(1, 2), k.transpose(1, 2), ratio, blkq, blkk)
    expected = brute_force_block_map(q, k, ratio, blkq, blkk)
    assert lut.shape == (1, 2, 7, sla_topk_count(ratio, 13))
    for head in range(2):
        for block in range(7):
            assert set(lut[0, head, block].tolist()) == expected[head][block]


def test_sparse_branch_matches_per_query_softmax_over_kept_blocks() -> None:
    q, k, v = qkv(1, 200, 2, 16, seed=4)
    blkq, blkk, ratio = 32, 16, 0.3
    kept = brute_force_block_map(q, k, ratio, blkq, blkk)
    expected = torch.empty(200, 2, 16, dtype=torch.float64)
    for head in range(2):
        for i in range(200):
            keys = sorted(t for j in kept[head][i // blkq] for t in range(j * blkk, min((j + 1) * blkk, 200)))
            scores = (k[0, keys, head].double() @ q[0, i, head].double()) / math.sqrt(16)
            expected[i, head] = scores.softmax(dim=0) @ v[0, keys, head].double()
    out = sla_reference(q, k, v, topk=ratio, blkq=blkq, blkk=blkk)
    assert rel_err(out[0], expected) < 1e-5


def test_linear_branch_formula_per_query() -> None:
    q, k, v = qkv(1, 50, 2, 8, seed=5)
    out = sla_linear_branch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for head in range(2):
        phi_k = k[0, :, head].double().softmax(dim=-1)
        for i in range(0, 50, 7):
            phi_q = q[0, i, head].double().softmax(dim=-1)
            numerator = sum((phi_q @ phi_k[j]) * v[0, j, head].double() for j in range(50))
            denominator = 1e-5 + sum(phi_q @ phi_k[j] for j in range(50))
            assert torch.allclose(out[0, i, head].double(), numerator / denominator, rtol=1e-5, atol=1e-6)


def test_output_is_sparse_plus_projected_linear_branch() -> None:
    q, k, v = qkv(1, 150, 2, 16, seed=6)
    torch.manual_seed(7)
    proj_l = nn.Linear(16, 16)
    sparse_only = sla_reference(q, k, v, topk=0.4)
    linear = sla_linear_branch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    with torch.no_grad():
        expected = sparse_only + proj_l(linear)
        assert rel_err(sla_reference(q, k, v, topk=0.4, proj_l=proj_l), expected) < 1e-6


def test_reference_keeps_input_dtype_and_handles_thousands_of_tokens() -> None:
    q, k, v = (t.bfloat16() for t in qkv(1, 4096, 2, 64, seed=8))
    out = sla_reference(q, k, v, topk=0.1, proj_l=zero_linear(64).bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.isfinite(out).all()


def test_backend_lookup() -> None:
    assert get_backend("original") is sdpa_attention
    assert get_backend("sla") is sla_reference  # CPU: the reference until a kernel is registered
    assert get_backend("sla_reference") is sla_reference
    assert resolve_attention("auto", device_type="cpu", has_sla_proj=True) == "original"
    assert resolve_attention("auto", device_type="cuda", has_sla_proj=True) in ("sla", "sagesla")  # test_sagesla
    assert resolve_attention("auto", device_type="cuda", has_sla_proj=False) == "original"
    with pytest.raises(AttentionUnavailable, match="spas_sage_attn|SpargeAttn") as info:
        get_backend("sagesla")
    assert "attention_type=sla" in str(info.value)
    with pytest.raises(ValueError, match="unknown attention type"):
        get_backend("flash")
