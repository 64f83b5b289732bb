"""Small @triton.jit helpers shared by the kernels: exact rounding and GELU.

Rounding is spelled out in float32 arithmetic rather than left to casts because Triton's CPU interpreter
(where the kernels are tested) rounds some float->fp8 casts wrongly; values that are already exactly
representable cast exactly everywhere, so the kernels behave the same on the CPU and the GPU, and the
extra integer ops are free in these memory-bound kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rint(x):
    """Round float32 to the nearest integer, ties to even (exact for |x| < 2^22)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_e4m3(x):
    """Nearest float8 e4m3 value of float32 x (|x| <= 448), ties to even, as float32 (so the cast is exact).

    Normal range: keep 3 mantissa bits by integer rounding of the float32 bit pattern (carry into the
    exponent included). Below 2^-6 e4m3 is subnormal, with a fixed step of 2^-9.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = rint(x * 512.0) * 0.001953125
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)."""
    u2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-u2))
