"""Quantized linears and the swap that puts them into a DiT.

Which layers: exactly TurboDiffusion's choice (reference/turbodiffusion.md §4): every nn.Linear inside
`model.blocks` except SLA's `proj_l`, i.e. self_attn.{q,k,v,o}, cross_attn.{q,k,v,o}, ffn.0, ffn.2.
Embeddings, time projection, head, norms and modulation stay in floating point.

Mode "int8" loads TurboDiffusion's `-quant` files (128x128 tile scales) into `TileInt8Linear`; on the GPU it
runs either a per-channel int8 GEMM on a once re-quantized weight (TD_INT8_KERNEL=rowcol, the default) or
TurboDiffusion's tile math (TD_INT8_KERNEL=tile); tile_int8.py explains the choice. Mode "fp8" is our own
load-time e4m3 quantization (fp8.py).
"""

from __future__ import annotations

from torch import nn

from turbodiffusion_core.quant.fp8 import Fp8Linear, dequantize_fp8_rowwise, quantize_fp8_rowwise
from turbodiffusion_core.quant.rowcol_int8 import (
    channel_int8_from_tiles,
    dequantize_int8_rowwise,
    quantize_int8_rowwise,
    w8a8_rowcol_reference,
)
from turbodiffusion_core.quant.tile_int8 import (
    TileInt8Linear,
    dequantize_tile_int8,
    int8_kernel_choice,
    quantize_tile_int8,
    w8a8_tile_reference,
)

QUANT_LINEAR_CLASSES: dict[str, type[TileInt8Linear] | type[Fp8Linear]] = {
    "int8": TileInt8Linear,
    "fp8": Fp8Linear,
}
SKIPPED_LINEAR = "proj_l"


def quantize_model_linears(model: nn.Module, mode: str) -> int:
    """Swap the block linears of `model` for quantized ones in place; returns how many were swapped.

    On a meta-device model this only builds the quantized module tree (empty buffers to be filled by
    loading a pre-quantized checkpoint); on real weights it quantizes them.
    """
    try:
        cls = QUANT_LINEAR_CLASSES[mode]
    except KeyError:
        raise ValueError(f"unknown quant mode {mode!r}; choose one of {', '.join(QUANT_LINEAR_CLASSES)}") from None
    swapped = 0
    for parent in list(model.blocks.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != SKIPPED_LINEAR:
                setattr(parent, name, cls.from_linear(child))
                swapped += 1
    return swapped


__all__ = [
    "Fp8Linear",
    "QUANT_LINEAR_CLASSES",
    "TileInt8Linear",
    "channel_int8_from_tiles",
    "dequantize_fp8_rowwise",
    "dequantize_int8_rowwise",
    "dequantize_tile_int8",
    "int8_kernel_choice",
    "quantize_fp8_rowwise",
    "quantize_int8_rowwise",
    "quantize_model_linears",
    "quantize_tile_int8",
    "w8a8_rowcol_reference",
    "w8a8_tile_reference",
]
