"""Our WanModel against diffusers' WanTransformer3DModel (an independent port of the official Wan model).

Both get the same random weights, renamed through the verified key map in
tests/data/keys/wan-to-diffusers-transformer-map.json; everything runs in float32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.diffusers_twin import diffusers_twin
from turbodiffusion_core.models.configs import DIT_CONFIGS, DiTConfig
from turbodiffusion_core.models.dit import WanModel

def random_model(cfg: DiTConfig, seed: int = 0, **kwargs: object) -> WanModel:
    """A model whose every parameter (norm weights and biases included) is random, so swaps show."""
    torch.manual_seed(seed)
    model = WanModel(cfg, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["tiny-t2v", "tiny-i2v"])
def test_matches_diffusers(arch: str) -> None:
    cfg = DIT_CONFIGS[arch]
    model = random_model(cfg)
    twin = diffusers_twin(model)
    torch.manual_seed(1)
    batch, frames, height, width = 2, 3, 4, 6
    x = torch.randn(batch, cfg.out_dim, frames, height, width)
    y = torch.randn(batch, cfg.cond_dim, frames, height, width) if cfg.cond_dim else None
    context = torch.randn(batch, 7, cfg.text_dim)  # shorter than text_len: the model pads it
    t = torch.tensor([988.0, 608.0])
    with torch.no_grad():
        ours = model(x, t, context, y)
        full_x = x if y is None else torch.cat([x, y], dim=1)
        padded = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # as diffusers' pipeline does
        theirs = twin(full_x, t, padded, return_dict=False)[0]
    assert ours.dtype == torch.float32
    assert ours.shape == (batch, cfg.out_dim, frames, height, width)
    assert rel_err(ours, theirs) < 1e-4


def test_real_head_dim_rope_split_is_22_21_21_pairs() -> None:
    assert DIT_CONFIGS["wan2.1-t2v-1.3b"].rope_split == (44, 42, 42)
    assert DIT_CONFIGS["tiny-t2v"].rope_split == (12, 10, 10)


def test_attention_is_switchable_per_call() -> None:
    model = random_model(DIT_CONFIGS["tiny-t2v"], with_sla_proj=True)
    torch.manual_seed(2)
    x = torch.randn(1, 16, 5, 16, 16)  # 320 tokens: 3 query blocks, 5 key blocks
    context = torch.randn(1, 5, 32)
    t = torch.tensor([500.0])
    with torch.no_grad():
        for block in model.blocks:
            block.self_attn.attn_op.local_attn.proj_l.weight.zero_()
            block.self_attn.attn_op.local_attn.proj_l.bias.zero_()
        dense = model(x, t, context)
        sla_full = model(x, t, context, attention="sla_reference", sla_topk=1.0)
        sla_sparse = model(x, t, context, attention="sla", sla_topk=0.2)
        model.set_attention("sla_reference", 1.0)
        via_setter = model(x, t, context)
    assert rel_err(sla_full, dense) < 1e-5  # every key block kept and zero proj_l = dense attention
    assert torch.equal(via_setter, sla_full)
    assert rel_err(sla_sparse, dense) > 1e-3  # 1 of 5 key blocks kept: a different function


def test_14b_builds_on_meta_without_memory() -> None:
    model = WanModel.on_meta("wan2.1-t2v-14b")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == 14_288_491_584  # reference/wan.md §1.6


def test_set_dtype_keeps_float32_where_the_model_computes_in_float32() -> None:
    model = WanModel("tiny-t2v").set_dtype(torch.bfloat16)
    block = model.blocks[0]
    assert block.self_attn.q.weight.dtype == torch.bfloat16
    assert block.modulation.dtype == torch.float32
    assert block.self_attn.norm_q.weight.dtype == torch.float32
    assert block.norm3.bias.dtype == torch.float32
    assert model.compute_dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.randn(1, 16, 1, 4, 4), torch.tensor([900.0]), torch.randn(1, 3, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_rejects_wrong_channels_and_overlong_text() -> None:
    model = WanModel("tiny-i2v")
    with pytest.raises(ValueError, match="36 input channels"):
        model(torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="at most 512"):
        model(torch.randn(1, 36, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 513, 32))
