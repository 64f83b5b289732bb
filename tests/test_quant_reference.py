"""Tile-int8 (TurboDiffusion W8A8), per-channel int8 and fp8 references: rounding, error bounds, exact math,
key names, the int8 layout switch and TD_INT8_KERNEL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from turbodiffusion_core.models.dit import WanModel
from turbodiffusion_core.quant import (
    Fp8Linear,
    TileInt8Linear,
    channel_int8_from_tiles,
    dequantize_int8_rowwise,
    dequantize_tile_int8,
    int8_kernel_choice,
    quantize_int8_rowwise,
    quantize_model_linears,
    quantize_tile_int8,
    w8a8_rowcol_reference,
    w8a8_tile_reference,
)
from turbodiffusion_core.quant.fp8 import Fp8Rows, Fp8WeightOnlyLinear, quantize_fp8_rowwise
from turbodiffusion_core.quant.rowcol_int8 import int8_matmul_exact

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


@pytest.mark.parametrize("per_channel", [False, True], ids=["tiles", "per-channel"])
def test_quantized_tiny_dit_stays_close_to_float(per_channel: bool) -> None:
    """int8 block linears in TurboDiffusion's tile layout, or re-quantized per output channel (rowcol)."""
    torch.manual_seed(4)
    model = WanModel("tiny-t2v").eval()
    x, context, t = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 4, 32), torch.tensor([700.0])
    with torch.no_grad():
        reference = model(x, t, context)
        quantize_model_linears(model, "int8")
        if per_channel:
            for module in model.modules():
                if isinstance(module, TileInt8Linear):
                    module.to_per_channel()
        assert rel_err(model(x, t, context), reference) < 5e-2


# ------------------------------------------------------------------ per-channel ("rowcol") int8 layout


def test_int8_matmul_exact_is_exact_with_extreme_values() -> None:
    gen = torch.Generator().manual_seed(5)
    q_a = torch.randint(-128, 128, (33, 700), generator=gen, dtype=torch.int8)
    q_b = torch.randint(-128, 128, (21, 700), generator=gen, dtype=torch.int8)
    q_a[0], q_b[0] = -128, -128  # the largest dot product: 700 * 2^14
    out = int8_matmul_exact(q_a, q_b)
    assert out.dtype == torch.int32 and out[0, 0] == 700 * 128 * 128
    assert torch.equal(out.long(), q_a.long() @ q_b.long().t())


def test_rowwise_int8_rounding_floor_and_scale() -> None:
    x = torch.zeros(2, 8)
    x[0, :6] = torch.tensor([2.5, 3.5, -2.5, 127.0, -127.0, 0.4])  # amax 127 -> scale 1, q = round(x)
    q, scale = quantize_int8_rowwise(x)
    assert scale.shape == (2,) and scale[0] == 1.0 and torch.allclose(scale[1], torch.tensor(1e-8 / 127))
    assert q[0, :6].tolist() == [2, 4, -2, 127, -127, 0] and q[1].abs().sum() == 0
    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(6)) * torch.logspace(-2, 1, 40)[:, None]
    q, scale = quantize_int8_rowwise(w)
    assert q.abs().max() == 127 and (q == -128).sum() == 0
    assert ((dequantize_int8_rowwise(q, scale) - w).abs() <= 0.5 * scale[:, None] * (1 + 1e-5)).all()


def test_w8a8_rowcol_reference_is_the_scaled_integer_product() -> None:
    gen = torch.Generator().manual_seed(7)
    x, w, bias = torch.randn(2, 35, 200, generator=gen), torch.randn(90, 200, generator=gen), torch.randn(90)
    q_w, s_w = quantize_int8_rowwise(w)
    q_a, s_a = quantize_int8_rowwise(x.reshape(70, 200))
    expected = (q_a.double() @ q_w.double().t()) * s_a.double()[:, None] * s_w.double() + bias.double()
    out = w8a8_rowcol_reference(x, q_w, s_w, bias)
    assert out.shape == (2, 35, 90) and rel_err(out.reshape(70, 90), expected) < 1e-6


def test_per_channel_module_on_cpu_and_its_checkpoint_layout(monkeypatch) -> None:
    monkeypatch.setenv("TD_INT8_KERNEL", "rowcol")
    torch.manual_seed(8)
    linear = nn.Linear(320, 200)
    x = torch.randn(4, 64, 320)
    layer = TileInt8Linear.from_linear(linear)
    assert not layer.per_channel  # no GPU kernel here: the module keeps TurboDiffusion's tiles
    tiles = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to_per_channel()
    assert layer.per_channel and layer.scale.shape == (200,) and "per_channel" in repr(layer)
    q_ch, s_ch = channel_int8_from_tiles(tiles["int8_weight"], tiles["scale"])
    with torch.no_grad():
        assert torch.equal(layer(x), w8a8_rowcol_reference(x, q_ch, s_ch, layer.bias))
        assert rel_err(layer(x), linear(x)) < 3e-2
    saved = layer.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {k: (v.dtype, v.shape) for k, v in tiles.items()}
    assert rel_err(dequantize_tile_int8(saved["int8_weight"], saved["scale"]), linear.weight.detach()) < 2e-2
    layer.load_state_dict(tiles)
    assert not layer.per_channel and torch.equal(layer.int8_weight, tiles["int8_weight"])


def test_fp8_linear_takes_rows_already_quantized() -> None:
    """What the fused LayerNorm hands the FP8 linears (e4m3 rows + scales) gives the module's output on the
    dequantized rows; an activation cannot be applied to such rows; the weight-only variant never takes them."""
    torch.manual_seed(5)
    linear = nn.Linear(64, 48)
    module = Fp8Linear.from_linear(linear)
    h = torch.randn(2, 10, 64)
    q, scale = quantize_fp8_rowwise(h.view(20, 64))
    rows = Fp8Rows(q.view(2, 10, 64), scale.view(20, 1), torch.float32)
    assert rows.shape == (2, 10, 64)
    with torch.no_grad():
        out = module(rows)
        assert out.shape == (2, 10, 48) and out.dtype == torch.float32
        assert torch.equal(out, module(rows.dequantize()))
        assert rel_err(out, linear(h)) < 5e-2
        with pytest.raises(ValueError, match="already quantized"):
            module(rows, act="gelu_tanh")
    assert Fp8Linear.takes_fp8_rows and not Fp8WeightOnlyLinear.takes_fp8_rows


def test_int8_kernel_choice_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("TD_INT8_KERNEL", raising=False)
    assert int8_kernel_choice() == "rowcol"
    monkeypatch.setenv("TD_INT8_KERNEL", " Tile ")
    assert int8_kernel_choice() == "tile"
    monkeypatch.setenv("TD_INT8_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="rowcol, tile"):
        int8_kernel_choice()

