"""The "original" backend: dense softmax attention through PyTorch's fused SDPA.

PyTorch picks flash / cuDNN / memory-efficient kernels on the GPU and a plain implementation on the CPU.
Inputs arrive as [B, L, H, D] (the layout the projections produce without a copy); the transposes to
SDPA's [B, H, L, D] are views, and the flash kernels write [B, L, H, D] memory, so the transpose back
costs nothing either.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    proj_l: Optional[nn.Linear] = None,
    topk: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `proj_l` and `topk` belong to the sparse backends; dense attention ignores them, which is what
    running a TurboDiffusion checkpoint with attention_type="original" means.
    """
    del proj_l, topk
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
