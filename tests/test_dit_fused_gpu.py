"""On a GPU, the DiT's fused Triton path (kernels/norm.py, kernels/rope.py, sla_triton, quantized linears)
against its own unfused PyTorch path, fresh random weights and inputs each run. Skips without CUDA."""

import os

import pytest
import torch

from tests.kernel_support import dit_forward, enliven_dit
from turbodiffusion_core.models.configs import DiTConfig
from turbodiffusion_core.models.dit import WanModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=2, in_dim=16, text_dim=256)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("attention,quant", [("original", None), ("sla", None), ("original", "fp8"),
                                             ("sla", "fp8"), ("sla", "int8")])
def test_fused_path_matches_unfused(attention, quant):
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = enliven_dit(WanModel(CFG, with_sla_proj=True, quant=quant))
    model.set_dtype(torch.bfloat16).eval()
    x = torch.randn(1, 16, 5, 32, 48, device="cuda", dtype=torch.bfloat16)  # 5*16*24 = 1920 tokens
    t = torch.tensor([900.0], device="cuda")
    ctx = torch.randn(1, 100, CFG.text_dim, device="cuda", dtype=torch.bfloat16)
    kw = {"attention": attention, "sla_topk": 0.5}
    fused = dit_forward(model, (x, t, ctx), fused=True, **kw)
    plain = dit_forward(model, (x, t, ctx), fused=False, **kw)
    err = _rel(fused, plain)
    print(f"seed {seed} {attention} {quant}: fused vs unfused rel err {err:.2e}")
    assert torch.isfinite(fused).all()
    assert err < 2e-2
