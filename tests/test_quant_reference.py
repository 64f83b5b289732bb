"""Tile-int8 (TurboDiffusion W8A8) and fp8 references: rounding, error bounds, exact tile math, key names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from turbodiffusion_core.models.dit import WanModel
from turbodiffusion_core.quant import (
    Fp8Linear,
    TileInt8Linear,
    dequantize_tile_int8,
    quantize_model_linears,
    quantize_tile_int8,
    w8a8_tile_reference,
)

QUANT_KEYS = Path(__file__).parent / "data" / "keys" / "turbowan2.1-t2v-1.3b-480p-quant.json"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rounding_is_nearest_even_with_saturation_and_amax_floor() -> None:
    tile = torch.zeros(128, 128)
    tile[0, :6] = torch.tensor([2.5, 3.5, -2.5, 128.0, -128.0, 0.4])  # amax 128 -> scale 1, q = x
    q, scale = quantize_tile_int8(tile)
    assert scale.shape == (1, 1) and scale.item() == 1.0
    assert q[0, :6].tolist() == [2, 4, -2, 127, -128, 0]
    q_zero, scale_zero = quantize_tile_int8(torch.zeros(3, 5))
    assert q_zero.abs().sum() == 0 and torch.allclose(scale_zero, torch.tensor([[1e-8 / 128]]))


def test_tile_grid_and_error_bounds_on_ragged_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=gen) * torch.logspace(-2, 1, 300)  # tiles with very different ranges
    q, scale = quantize_tile_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 3)
    per_element = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    error = (dequantize_tile_int8(q, scale) - w).abs()
    saturated = q == 127
    assert (error[~saturated] <= 0.5 * per_element[~saturated] * (1 + 1e-5)).all()
    assert (error <= per_element * (1 + 1e-5)).all()
    # every tile's scale is its amax / 128
    assert torch.allclose(scale[1, 2], w[128:, 256:].abs().max() / 128)


def test_w8a8_reference_is_the_exact_tile_sum() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 320, generator=gen)  # M = 210 rows (2 row tiles), K = 320 (3 K tiles)
    w = torch.randn(150, 320, generator=gen)
    bias = torch.randn(150, generator=gen)
    q_w, s_w = quantize_tile_int8(w)
    out = w8a8_tile_reference(x, q_w, s_w, bias)
    q_a, s_a = quantize_tile_int8(x.reshape(-1, 320))
    expected = torch.zeros(210, 150, dtype=torch.float64)
    for kb in range(3):
        cols = slice(kb * 128, (kb + 1) * 128)
        dot = q_a[:, cols].double() @ q_w[:, cols].double().t()
        row_scale = s_a[:, kb].double().repeat_interleave(128)[:210, None]
        col_scale = s_w[:, kb].double().repeat_interleave(128)[None, :150]
        expected += dot * row_scale * col_scale
    expected += bias.double()
    assert out.shape == (3, 70, 150)
    assert rel_err(out.reshape(210, 150), expected) < 1e-6


def test_tile_int8_linear_is_close_to_the_float_linear() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(320, 200)
    x = torch.randn(4, 64, 320)
    quantized = TileInt8Linear.from_linear(linear)
    with torch.no_grad():
        assert rel_err(quantized(x), linear(x)) < 3e-2


def test_fp8_linear_is_close_to_the_float_linear() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(256, 96)
    x = torch.randn(2, 50, 256)
    quantized = Fp8Linear.from_linear(linear)
    assert quantized.weight.dtype == torch.float8_e4m3fn and quantized.weight_scale.shape == (96,)
    with torch.no_grad():
        assert rel_err(quantized(x), linear(x)) < 5e-2


def test_tile_int8_linear_buffers_match_the_quant_checkpoint() -> None:
    layer = TileInt8Linear(8960, 1536)
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "int8_weight": (torch.int8, (1536, 8960)),
        "scale": (torch.float32, (12, 70)),
        "bias": (torch.bfloat16, (1536,)),
    }
    listed = json.loads(QUANT_KEYS.read_text())["tensors"]
    for name, tensor in state.items():
        entry = listed[f"blocks.0.ffn.2.{name}"]
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == str(tensor.dtype).removeprefix("torch.")


def test_quantize_model_linears_swaps_exactly_turbodiffusions_layers() -> None:
    model = WanModel("tiny-t2v", with_sla_proj=True)
    assert quantize_model_linears(model, "int8") == 10 * model.cfg.num_layers
    assert type(model.blocks[0].self_attn.attn_op.local_attn.proj_l) is nn.Linear
    assert type(model.patch_embedding) is nn.Linear and type(model.head.head) is nn.Linear
    ours = {re.sub(r"blocks\.\d+\.", "blocks.N.", key) for key in model.state_dict()}
    listed = {re.sub(r"blocks\.\d+\.", "blocks.N.", key) for key in json.loads(QUANT_KEYS.read_text())["tensors"]}
    assert ours == listed


def test_quantized_tiny_dit_stays_close_to_float() -> None:
    torch.manual_seed(4)
    model = WanModel("tiny-t2v").eval()
    x, context, t = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 4, 32), torch.tensor([700.0])
    with torch.no_grad():
        reference = model(x, t, context)
        quantize_model_linears(model, "int8")
        assert rel_err(model(x, t, context), reference) < 5e-2
