"""Triton kernels for the DiT's memory-bound elementwise work, and the Triton plumbing the engine shares.

Why fused kernels: in TurboDiffusion's profiled 1.3B forward about half of the 373 ms went to dtype copies
and unfused elementwise ops (shared/design.md §6). Each kernel here reads its inputs once and writes its
output once, in the dtype the next op wants:

- `norm.py`: gated residual add and LayerNorm (+ affine, + adaLN modulation) in one pass, output bf16 or
  fp8 with a per-row scale for the next quantized linear.
- `rope.py`: q/k RMSNorm across heads and Wan's interleaved 3D RoPE in one pass over q and k.
- `jit_math.py`: @triton.jit helpers the kernels share (exact e4m3 and integer rounding, GELU-tanh).
- `triton_support.py`: whether Triton can run here, interpreter-safe autotuning, and a process runner
  for Triton's CPU interpreter (the kernel tests).

Importing this package imports neither torch nor triton; the kernel modules import triton, so callers
import them only after `triton_support.kernels_usable(...)` said yes.
"""
