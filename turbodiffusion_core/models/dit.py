"""The Wan2.1 / Wan2.2 diffusion transformer (`WanModel`), numerically faithful to the official code.

Math and naming follow reference/wan.md §1 and its §8 checklist; the points that are easy to get wrong:
- Module names give exactly the official state-dict keys (blocks.N.self_attn.q, norm3, ffn.0, ffn.2,
  head.head, head.modulation, time_projection.1, ...). Naming trap kept from the original: `norm3` is the
  (affine) cross-attention pre-norm, `norm2` the FFN pre-norm.
- The patch embedding is a Linear over the flattened (c, kt, kh, kw) patch, as TurboDiffusion stores it;
  it equals the official Conv3d with stride = kernel (checkpoints.py reshapes Conv3d weights).
- Residual stream, modulation, time embedding, norms, RoPE and the head run in float32; the big matmuls
  and attention run in the parameter dtype (bf16 on a GPU). Norm weights and modulation tables are kept
  in float32 (see `runtime_dtype`).
- Time: sinusoid [cos, sin] of the raw timestep value (e.g. 988.0, not 0.988) in float64;
  e = time_embedding(.), e0 = time_projection(e) shared by all blocks; the head modulates with e, not e0.
- q and k are RMS-normalised over the full width (all heads) before the 3D RoPE, which rotates
  interleaved pairs with the head split d-4*(d//6) / 2*(d//6) / 2*(d//6) over (frame, height, width).
- Text is zero-padded to text_len (512) and cross-attention has no mask (the padded rows carry the
  embedding of a zero vector, as in the reference).
- Wan2.2 A14B experts are this same network with in_dim 36; their per-token timestep path is
  numerically identical for the constant t used here.

The self-attention backend (dense SDPA or SLA) and SLA's top-k are forward arguments, so one resident
model serves requests that ask for different ones.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from turbodiffusion_core.attention import BACKEND_NAMES, AttentionFn, get_backend
from turbodiffusion_core.attention.sdpa import sdpa_attention
from turbodiffusion_core.models.configs import DiTConfig, get_dit_config
from turbodiffusion_core.quant.base import QuantizedLinear
from turbodiffusion_core.quant.fp8 import Fp8Rows
from turbodiffusion_core.quant.rowcol_int8 import Int8Rows

if TYPE_CHECKING:
    from turbodiffusion_core.parallel.ulysses import SPGroup

ROPE_THETA = 10000.0
SLA_TOPK_DEFAULT = 0.1

_FP32_SUFFIXES = ("modulation", "norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias")
_FP32_QUANT_SUFFIXES = (".scale", ".weight_scale")


def runtime_dtype(name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter/buffer `name` is held in when the model runs in `dtype`.

    Integer and float8 payloads of quantized linears keep their type, their scales, the norm weights
    and the modulation tables are float32 (the model does that math in float32), the rest is `dtype`.
    """
    if not stored.is_floating_point or stored in (torch.float8_e4m3fn, torch.float8_e5m2):
        return stored
    if name.endswith(_FP32_SUFFIXES) or name.endswith(_FP32_QUANT_SUFFIXES):
        return torch.float32
    return dtype


def _linear_fp32(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A small Linear evaluated in float32 whatever its weight dtype (time embedding, head)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] of t * 10000^(-i/half) in float64 (as the reference), returned as float32 [B, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_tables(cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Unit complex rotations [L, 1, head_dim/2] (complex64) of the 3D RoPE for a (frames, height, width) grid.

    Each axis has its own frequency base over its own channel count D_axis: freq_j = theta^(-2j/D_axis),
    position = integer grid coordinate. Computed in float64 like the reference, then rounded once.
    """
    per_axis = []
    for size, channels in zip(grid, cfg.rope_split):
        inv_freq = ROPE_THETA ** (-torch.arange(0, channels, 2, dtype=torch.float64, device=device) / channels)
        per_axis.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv_freq))
    f, h, w = grid
    angles = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x [B, L, H, D] in float32; returns x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole last dimension (for q/k: across all heads), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in float32 (it feeds the float32 residual math)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class SLALocalAttention(nn.Module):
    """Holds SLA's linear-branch projection `proj_l` (Linear(head_dim, head_dim), zero-initialised like
    SLA's, so an untuned layer is pure block-sparse attention). It lives at TurboDiffusion's module path
    `self_attn.attn_op.local_attn.proj_l` so that its checkpoint keys load unchanged."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.proj_l = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)


class SLAAttentionOp(nn.Module):
    """The `attn_op` level of TurboDiffusion's module path; only carries `local_attn`."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.local_attn = SLALocalAttention(head_dim)


class _Attention(nn.Module):
    """The projections both attentions own, under the official key names: q, k, v, o and the q/k RMSNorms
    (across all heads)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class WanSelfAttention(_Attention):
    def __init__(self, dim: int, num_heads: int, eps: float, with_sla_proj: bool) -> None:
        super().__init__(dim, num_heads, eps)
        self.attn_op = SLAAttentionOp(self.head_dim) if with_sla_proj else None

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, attn: AttentionFn, topk: float
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        if _fused(x):
            from turbodiffusion_core.kernels.rope import qk_norm_rope

            q, k = qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, rope,
                                num_heads=self.num_heads, eps=self.norm_q.eps, inplace=True)
        else:
            q = apply_rope(self.norm_q(self.q(x)).view(heads), rope)
            k = apply_rope(self.norm_k(self.k(x)).view(heads), rope)
        v = self.v(x).view(heads)
        proj_l = self.attn_op.local_attn.proj_l if self.attn_op is not None else None
        out = attn(q, k, v, proj_l=proj_l, topk=topk)
        return self.o(out.reshape(batch, length, -1))


class WanCrossAttention(_Attention):
    """Text cross-attention (T2V and the Wan2.2 experts): q from x, k/v from the text, q/k RMSNorm, no RoPE,
    no mask, always dense."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        if _fused(x):
            from turbodiffusion_core.kernels.rope import rms_norm_rows

            q = rms_norm_rows(self.q(x), self.norm_q.weight, eps=self.norm_q.eps, inplace=True)
        else:
            q = self.norm_q(self.q(x))
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(batch, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(batch, -1, self.num_heads, self.head_dim)
        return self.o(sdpa_attention(q, k, v).reshape(batch, length, -1))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, with_sla_proj: bool) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps, with_sla_proj)
        self.norm3 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        attn: AttentionFn,
        topk: float,
    ) -> torch.Tensor:
        """x: float32 residual [B, L, dim]; e0: float32 [B, 6, dim]; context in the compute dtype."""
        dtype = context.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        if _fused(x):
            return self._forward_fused(x, context, rope, attn, topk, shift_sa, scale_sa, gate_sa, shift_ff,
                                       scale_ff, gate_ff)
        h = torch.addcmul(shift_sa, self.norm1(x), 1 + scale_sa)
        x = torch.addcmul(x, self.self_attn(h.to(dtype), rope, attn, topk), gate_sa)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context)
        h = torch.addcmul(shift_ff, self.norm2(x), 1 + scale_ff)
        return torch.addcmul(x, self.ffn(h.to(dtype)), gate_ff)

    def _forward_fused(self, x, context, rope, attn, topk, shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff):
        """The same block with the Triton kernels (kernels/norm.py, kernels/rope.py): each residual update
        and the LayerNorm + modulation after it are one pass over the float32 stream; when the linears
        that read a norm's output are FP8 or per-channel int8, that pass also quantizes it (once for q, k
        and v together);
        the FFN's GELU is fused into the down projection's activation quantizer when that layer is
        quantized."""
        from turbodiffusion_core.kernels.norm import residual_layernorm

        dtype = context.dtype
        sa, ca, up, down = self.self_attn, self.cross_attn, self.ffn[0], self.ffn[2]
        _, h, h_scale = residual_layernorm(x, shift=shift_sa, scale=scale_sa, eps=self.norm1.eps,
                                           out_dtype=_norm_out_dtype(dtype, sa.q, sa.k, sa.v))
        y = sa(_linear_input(h, h_scale, dtype), rope, attn, topk)
        x, h, h_scale = residual_layernorm(x, y, gate_sa, weight=self.norm3.weight.float(),
                                           bias=self.norm3.bias.float(), eps=self.norm3.eps,
                                           out_dtype=_norm_out_dtype(dtype, ca.q), inplace=True)
        y = ca(_linear_input(h, h_scale, dtype), context)
        x, h, h_scale = residual_layernorm(x, y, shift=shift_ff, scale=scale_ff, eps=self.norm2.eps,
                                           out_dtype=_norm_out_dtype(dtype, up), inplace=True)
        h = _linear_input(h, h_scale, dtype)
        if isinstance(down, QuantizedLinear):  # GELU fused into its activation quantizer
            y = down(up(h), act="gelu_tanh")
        else:
            y = down(F.gelu(up(h), approximate="tanh"))
        x, _, _ = residual_layernorm(x, y, gate_ff, norm=False, inplace=True)
        return x


def _norm_out_dtype(dtype: torch.dtype, *readers: nn.Module) -> torch.dtype:
    """e4m3 (int8) when every linear that reads the norm's output takes pre-quantized FP8 (per-channel int8)
    rows, else dtype."""
    if all(getattr(m, "takes_fp8_rows", False) for m in readers):
        return torch.float8_e4m3fn
    if all(getattr(m, "takes_int8_rows", False) for m in readers):
        return torch.int8
    return dtype


def _linear_input(
    h: torch.Tensor, h_scale: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor | Fp8Rows | Int8Rows:
    """The norm's output as its linears take it: plain, or e4m3 / int8 rows with their scales."""
    if h_scale is None:
        return h
    return Int8Rows(h, h_scale, dtype) if h.dtype == torch.int8 else Fp8Rows(h, h_scale, dtype)


def _fused(x: torch.Tensor) -> bool:
    """Whether the Triton elementwise kernels run here: CUDA tensors with Triton installed, or CPU tensors
    under Triton's interpreter (how CPU tests exercise this path; never the case in a deployment).
    TD_NO_FUSED=1 turns them off (to measure what they save, or to rule them out)."""
    if os.environ.get("TD_NO_FUSED") == "1":
        return False
    from turbodiffusion_core.kernels.triton_support import kernels_usable

    return kernels_usable(x)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.patch_volume * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x float32 [B, L, dim], e float32 [B, dim] -> float32 [B, L, patch_volume * out_dim]."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return _linear_fp32(torch.addcmul(shift, self.norm(x), 1 + scale), self.head)


class WanModel(nn.Module):
    """Wan DiT. Weights start random (PyTorch defaults); real ones come from `checkpoints.load_dit`.

    Args:
        cfg: a DiTConfig or an arch name from DIT_CONFIGS.
        attention: default self-attention backend name (see turbodiffusion_core.attention); a forward
            call can override it.
        sla_topk: default fraction of key blocks SLA keeps.
        with_sla_proj: give every self-attention an SLA `proj_l` (TurboDiffusion checkpoints have them).
        quant: None, "int8" or "fp8": build the block linears quantized (turbodiffusion_core.quant).
    """

    def __init__(
        self,
        cfg: DiTConfig | str,
        *,
        attention: str = "original",
        sla_topk: float = SLA_TOPK_DEFAULT,
        with_sla_proj: bool = False,
        quant: Optional[str] = None,
    ) -> None:
        super().__init__()
        cfg = get_dit_config(cfg)
        self.cfg = cfg
        self.with_sla_proj = with_sla_proj
        self.quant = quant
        dim = cfg.dim
        self.patch_embedding = nn.Linear(cfg.patch_in_features, dim)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg, with_sla_proj) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._rope_cache: dict[tuple[tuple[int, int, int], torch.device], torch.Tensor] = {}
        self.set_attention(attention, sla_topk)
        if quant is not None:
            from turbodiffusion_core.quant import quantize_model_linears

            quantize_model_linears(self, quant)

    @classmethod
    def on_meta(cls, cfg: DiTConfig | str, **kwargs: object) -> "WanModel":
        """Build the module tree on the meta device: shapes only, no memory (for loading a 14B model)."""
        with torch.device("meta"):
            return cls(cfg, **kwargs)

    def set_attention(self, attention: str, sla_topk: Optional[float] = None) -> None:
        """Change the default attention backend (and SLA top-k) used when forward is not told otherwise."""
        if attention not in BACKEND_NAMES:
            raise ValueError(f"unknown attention type {attention!r}; choose one of {', '.join(BACKEND_NAMES)}")
        self.attention = attention
        if sla_topk is not None:
            self.sla_topk = sla_topk

    def set_dtype(self, dtype: torch.dtype) -> "WanModel":
        """Cast in place to run in `dtype`, keeping float32 where the model computes in float32."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            tensor.data = tensor.data.to(runtime_dtype(name, tensor.dtype, dtype))
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the matmul inputs (the text embedding is never quantized, so it tells)."""
        return self.text_embedding[0].weight.dtype

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.cfg, grid, device)
        return self._rope_cache[key]

    def _time_embedding(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """e [B, dim] and e0 [B, 6, dim], float32."""
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
        first, act, second = self.time_embedding
        e = _linear_fp32(act(_linear_fp32(sinusoidal_embedding(t, self.cfg.freq_dim), first)), second)
        e0 = _linear_fp32(F.silu(e), self.time_projection[1]).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def _text_embedding(self, context: torch.Tensor) -> torch.Tensor:
        text_len = self.cfg.text_len
        if context.shape[1] > text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; the model takes at most {text_len}")
        padded = F.pad(context.to(self.compute_dtype), (0, 0, 0, text_len - context.shape[1]))
        return self.text_embedding(padded)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        attention: Optional[str] = None,
        sla_topk: Optional[float] = None,
        sp_group: Optional["SPGroup"] = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: noisy latent [B, out_dim, F, H, W] (or all in_dim channels when y is None).
            t: timestep values as fed to the network, [B] (or one value), e.g. 988.0.
            context: text embeddings [B, L <= text_len, text_dim]; zero-padded to text_len here.
            y: image conditioning [B, in_dim - out_dim, F, H, W] (mask + first-frame latent), appended
                after x on channels.
            attention, sla_topk: per-call override of the self-attention backend and SLA top-k.
            sp_group: run this forward sequence-parallel over the group's ranks (turbodiffusion_core.parallel):
                each rank gets the same inputs, keeps 1/N of the tokens and returns the whole output.

        Returns:
            float32 [B, out_dim, F, H, W].
        """
        cfg = self.cfg
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        batch, channels, frames, height, width = x.shape
        if channels != cfg.in_dim:
            raise ValueError(f"model takes {cfg.in_dim} input channels (x and y together), got {channels}")
        kt, kh, kw = cfg.patch_size
        if frames % kt or height % kh or width % kw:
            raise ValueError(f"latent size {(frames, height, width)} is not a multiple of the patch {cfg.patch_size}")
        grid = (frames // kt, height // kh, width // kw)
        tokens = (
            x.to(self.compute_dtype)
            .reshape(batch, channels, grid[0], kt, grid[1], kh, grid[2], kw)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)
            .reshape(batch, math.prod(grid), cfg.patch_in_features)
        )
        rope = self._rope(grid, x.device)
        attn = get_backend(
            attention or self.attention, device_type=x.device.type, has_sla_proj=self.with_sla_proj
        )
        shard = None
        if sp_group is not None and sp_group.size > 1:  # this rank keeps 1/N of the tokens (parallel/ulysses.py)
            from turbodiffusion_core.parallel.ulysses import SequenceShard

            shard = SequenceShard(sp_group, tokens.shape[1], cfg.num_heads)
            tokens, rope, attn = shard.split(tokens), shard.split_rope(rope), shard.attention(attn)
        hidden = self.patch_embedding(tokens).float()
        e, e0 = self._time_embedding(torch.as_tensor(t, device=x.device), batch)
        context = self._text_embedding(context)
        topk = self.sla_topk if sla_topk is None else sla_topk
        for block in self.blocks:
            hidden = block(hidden, e0, context, rope, attn, topk)
        out = self.head(hidden, e)
        if shard is not None:
            out = shard.gather(out)
        return (
            out.view(batch, *grid, kt, kh, kw, cfg.out_dim)
            .permute(0, 7, 1, 4, 2, 5, 3, 6)
            .reshape(batch, cfg.out_dim, frames, height, width)
        )
