"""Ulysses sequence parallelism for one DiT forward: the token stream split over N ranks.

Every part of a Wan block except self-attention works token by token (norms, modulation, the q/k/v/o
and FFN linears, RoPE, text cross-attention whose keys are the full text on every rank), so each rank
runs them on its own slice of L/N tokens. Self-attention needs the whole sequence, and SLA's block map
needs it *per head*; heads are independent, so around the attention call two all-to-alls trade the
split:

    q, k, v  [B, L/N, H, D]  --all-to-all-->  [B, L, H/N, D]   every token, H/N heads
    attention(q, k, v) on the full sequence of those heads (any backend: original, sla, sla_reference)
    out      [B, L, H/N, D]  --all-to-all-->  [B, L/N, H, D]   back to this rank's tokens, all heads

L is padded up to a multiple of N (the last rank's tail is zero tokens); the padding is cut off before
the attention call, so padded tokens are never keys and never change a real token, and cut off again
when the head's output is gathered. RoPE rotations are sliced with the same offsets, so every token
keeps its global (frame, height, width) position. H must be a multiple of N (`check_world_size`).

The DiT calls this through `WanModel.forward(..., sp_group=SPGroup)`; with one rank it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from turbodiffusion_core.attention import AttentionFn
from turbodiffusion_core.errors import EngineError


class SequenceParallelError(EngineError):
    """The model cannot be split over this many ranks (heads not divisible), or the group is unusable."""

    code = "sequence_parallel_unsupported"


@dataclass(frozen=True)
class SPGroup:
    """The ranks that share one DiT forward: `group` (None = the default group), this rank, and N."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int

    @classmethod
    def of(cls, group: Optional[dist.ProcessGroup] = None) -> "SPGroup":
        """The SPGroup of an initialised process group (default: the whole world)."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


def valid_world_sizes(num_heads: int) -> list[int]:
    """Rank counts a model with `num_heads` heads can be split over (the divisors of num_heads)."""
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def check_world_size(num_heads: int, world_size: int, what: str = "this model") -> None:
    """Raise SequenceParallelError unless `world_size` ranks can split `num_heads` heads evenly."""
    if world_size < 1 or num_heads % world_size:
        sizes = ", ".join(str(n) for n in valid_world_sizes(num_heads))
        raise SequenceParallelError(
            f"sequence parallelism gives each GPU an equal share of the attention heads, and {what} has "
            f"{num_heads} heads, so it cannot run on {world_size} GPUs; use one of: {sizes}"
        )


class SequenceShard:
    """This rank's slice of a sequence of `length` tokens, and the collectives that move it.

    Rank r holds tokens [r * local, (r + 1) * local) of the sequence padded to N * local.
    """

    def __init__(self, sp: SPGroup, length: int, num_heads: int) -> None:
        check_world_size(num_heads, sp.size)
        self.sp = sp
        self.length = length
        self.num_heads = num_heads
        self.local = -(-length // sp.size)
        self.padded = self.local * sp.size
        self.start = sp.rank * self.local

    # -- the token split ------------------------------------------------------------------------
    def split(self, x: torch.Tensor, dim: int = 1, fill: float = 0.0) -> torch.Tensor:
        """This rank's `local` tokens of x along `dim` (padded with `fill` past the real length)."""
        pad = self.padded - x.shape[dim]
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
            x = F.pad(x, widths, value=fill)
        return x.narrow(dim, self.start, self.local).contiguous()

    def split_rope(self, rotations: torch.Tensor) -> torch.Tensor:
        """The RoPE rotations [L, 1, D/2] (complex) of this rank's tokens, by global position.
        Padded positions get the identity rotation (their values never reach a real token)."""
        pad = self.padded - rotations.shape[0]
        if pad:
            rotations = torch.cat([rotations, rotations.new_ones((pad, *rotations.shape[1:]))])
        return rotations[self.start : self.start + self.local].contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's slice along `dim` put back together (same result on every rank), padding removed."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.sp.size)]
        dist.all_gather(parts, x, group=self.sp.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)

    # -- around self-attention ------------------------------------------------------------------
    def to_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, local, H, D] -> [B, length, H/N, D]: all tokens of this rank's heads (one all-to-all)."""
        n = self.sp.size
        batch, local, heads, dim = q.shape
        h = heads // n
        send = q.new_empty((n, 3, batch, local, h, dim))  # [destination rank, q|k|v, B, tokens, its heads, D]
        for i, x in enumerate((q, k, v)):
            send[:, i].copy_(x.unflatten(2, (n, h)).permute(2, 0, 1, 3, 4))
        recv = torch.empty_like(send)  # [source rank = sequence chunk, q|k|v, B, tokens, my heads, D]
        dist.all_to_all_single(recv, send, group=self.sp.group)
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, n * local, h, dim)
        if self.padded != self.length:
            full = full[:, :, : self.length]
            if batch > 1:
                full = full.contiguous()
        return full[0], full[1], full[2]

    def to_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, length, H/N, D] -> [B, local, H, D]: this rank's tokens, all heads."""
        n = self.sp.size
        batch, _, h, dim = out.shape
        if self.padded != self.length:
            out = F.pad(out, (0, 0, 0, 0, 0, self.padded - self.length))
        send = out.reshape(batch, n, self.local, h, dim).transpose(0, 1).contiguous()  # [dest = chunk, ...]
        recv = torch.empty_like(send)  # [source rank = head group, B, local, h, D]
        dist.all_to_all_single(recv, send, group=self.sp.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(batch, self.local, n * h, dim)

    def attention(self, attn: AttentionFn) -> AttentionFn:
        """`attn` made to take and return this rank's tokens while it computes on the full sequence."""

        def sequence_parallel_attention(q, k, v, *, proj_l=None, topk=0.1):
            qf, kf, vf = self.to_heads(q, k, v)
            return self.to_sequence(attn(qf, kf, vf, proj_l=proj_l, topk=topk))

        return sequence_parallel_attention
