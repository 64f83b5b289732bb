"""The DiT's fused block path (kernels/norm.py, kernels/rope.py, GELU fused into quantized linears) on the CPU,
under Triton's interpreter, against the same model's unfused PyTorch path.

On a deployment that path runs only on the GPU, so without this test its Python-level mistakes (a wrong
argument, an object without the attribute the path reads) would first show on the scarce GPU runs.
`test_cpu_kernels_in_interpreter` reruns the kernel test files in one interpreter process (tests/kernel_support.py);
the GPU twin at a realistic width is tests/test_dit_fused_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernel_support import check_interpreter_run, dit_forward, enliven_dit, on_cpu, rel_err  # noqa: E402
from turbodiffusion_core.kernels import norm  # noqa: E402
from turbodiffusion_core.models.configs import DiTConfig  # noqa: E402
from turbodiffusion_core.models.dit import WanModel  # noqa: E402

CFG = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, text_dim=32)


def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)


@on_cpu
@pytest.mark.parametrize("attention,quant", [("original", None), ("sla", None), ("sla", "fp8"), ("sla", "int8")])
def test_fused_block_path_matches_the_unfused_one(attention, quant, monkeypatch):
    torch.manual_seed(11)
    model = enliven_dit(WanModel(CFG, with_sla_proj=True, quant=quant)).eval()
    x = torch.randn(1, 16, 2, 8, 8)  # 2 x 4 x 4 = 32 tokens
    t = torch.tensor([900.0])
    ctx = torch.randn(1, 7, CFG.text_dim)

    calls = []
    real = norm.residual_layernorm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(norm, "residual_layernorm", counted)
    kw = {"attention": attention, "sla_topk": 0.5}
    fused = dit_forward(model, (x, t, ctx), fused=True, **kw)
    assert len(calls) == 4 * CFG.num_layers  # the fused path ran: 4 residual/norm passes a block
    plain = dit_forward(model, (x, t, ctx), fused=False, **kw)
    assert len(calls) == 4 * CFG.num_layers  # and the unfused one did not use the kernels
    assert fused.shape == plain.shape and torch.isfinite(fused).all()
    # FP8: the fused path hands its linears e4m3 rows (W8A8), the unfused one runs them weight-only on the CPU
    assert rel_err(fused, plain) < (5e-2 if quant == "fp8" else 1e-4)


@on_cpu
def test_per_channel_int8_linears_take_int8_rows_from_the_norms(monkeypatch):
    """With per-channel int8 linears the fused path's norms write int8 rows + scales (q, k and v share one
    quantization; so do cross-attention q and the FFN up projection), and the result stays that of the
    unfused path, which quantizes each linear's input itself."""
    from turbodiffusion_core.quant.rowcol_int8 import Int8Rows
    from turbodiffusion_core.quant.tile_int8 import TileInt8Linear

    torch.manual_seed(12)
    model = enliven_dit(WanModel(CFG, with_sla_proj=True, quant="int8")).eval()
    layers = [m for m in model.modules() if isinstance(m, TileInt8Linear)]
    for layer in layers:
        layer.to_per_channel()
    seen = []
    real = TileInt8Linear.forward

    def recording(self, x, act=None):
        seen.append(isinstance(x, Int8Rows))
        return real(self, x, act)

    monkeypatch.setattr(TileInt8Linear, "forward", recording)
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([900.0]), torch.randn(1, 7, CFG.text_dim)
    kw = {"attention": "sla", "sla_topk": 0.5}
    fused = dit_forward(model, (x, t, ctx), fused=True, **kw)
    assert sum(seen) == 5 * CFG.num_layers  # q, k, v, cross-attention q, FFN up
    seen.clear()
    plain = dit_forward(model, (x, t, ctx), fused=False, **kw)
    assert not any(seen)
    print("int8 rows, fused vs unfused:", rel_err(fused, plain))
    assert torch.isfinite(fused).all() and rel_err(fused, plain) < 2e-2
    tiles = TileInt8Linear(64, 64)  # tile layout: its kernel quantizes per tile, it cannot take int8 rows
    rows = Int8Rows(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1), torch.float32)
    with pytest.raises(ValueError, match="per-channel"):
        tiles(rows)
