"""The ranks of one sequence-parallel pipeline: process group, rank 0's commands, the followers' loop.

Rank 0 is an ordinary `VideoPipeline` (text encoder, VAE, sampler, progress and cancel all stay there)
whose DiT experts' forward is a `ShardedDiT`. Each call is one command to the other ranks, then the
sharded forward every rank runs together:

    rank 0                                         ranks 1..N-1 (`serve`)
    ShardedDiT(x, t, context, y)                   wait for a command
      control: {"op": "forward", expert, shapes}   -> receive it
      data:    broadcast x, t, context, y          -> receive the tensors (the latents come from rank 0)
      model(..., sp_group)  <-- all-to-alls -->    model(..., sp_group)
    ...next step, or Cancelled, or done            wait for the next command
    close(): {"op": "exit"}                        return

So the followers never decide anything: cancellation and progress live on rank 0 (a cancelled job
simply sends no further "forward"), and the latents every step starts from are rank 0's. Commands go
over a separate gloo group with a very long timeout (an idle worker's followers may wait for hours);
tensors and the all-to-alls go over the main group (NCCL on GPUs, gloo on CPUs).

A failure inside a sharded forward leaves the ranks out of step (some may sit in a collective), so it
marks the group broken: later calls raise at once, and the owner (CLI, worker) should end every rank.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from turbodiffusion_core.errors import EngineError, WorkerBroken
from turbodiffusion_core.parallel.ulysses import SequenceParallelError, SPGroup, check_world_size

log = logging.getLogger("turbodiffusion.parallel")

CONTROL_TIMEOUT = timedelta(days=365)
"""How long a follower may wait for rank 0's next command (an idle worker waits for jobs)."""


@dataclass
class ParallelContext:
    """This process's place in the group."""

    rank: int
    world_size: int
    device: torch.device
    sp: SPGroup
    control: Any  # the gloo ProcessGroup that carries commands
    lock: threading.Lock = field(default_factory=threading.Lock)  # one command + forward at a time
    broken: Optional[str] = None
    forwards: int = 0  # sharded forwards run by this rank (rank 0: commanded)

    # -- commands (rank 0 -> everyone) ----------------------------------------------------------
    def send(self, op: str, **fields: Any) -> None:
        dist.broadcast_object_list([{"op": op, **fields}], src=0, group=self.control)

    def recv(self) -> dict:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # -- tensors (rank 0 -> everyone, on the data group) ----------------------------------------
    @staticmethod
    def specs(tensors: dict[str, Optional[torch.Tensor]]) -> dict[str, Optional[tuple]]:
        """(shape, dtype name) of each tensor (None for an absent one): what a receiver allocates."""
        specs = {}
        for name, value in tensors.items():
            specs[name] = None if value is None else (tuple(value.shape), str(value.dtype).replace("torch.", ""))
        return specs

    def broadcast(self, tensors: dict[str, Optional[torch.Tensor]]) -> None:
        """Rank 0's side of `receive`: send each present tensor, in order."""
        for value in tensors.values():
            if value is not None:
                dist.broadcast(value, src=0, group=self.sp.group)

    def receive(self, specs: dict[str, Optional[tuple]]) -> dict[str, Optional[torch.Tensor]]:
        """A follower's side of `broadcast`: the tensors rank 0 sent, by their specs."""
        out: dict[str, Optional[torch.Tensor]] = {}
        for name, shape_dtype in specs.items():
            if shape_dtype is None:
                out[name] = None
                continue
            shape, dtype = shape_dtype
            out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(out[name], src=0, group=self.sp.group)
        return out


def init_ranks(
    rank: int, world_size: int, *, device: torch.device, init_method: str = "env://"
) -> ParallelContext:
    """Join the process group (NCCL for CUDA devices, gloo for the CPU) and make the command group."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    log.info("rank %d of %d on %s", rank, world_size, device)
    return ParallelContext(rank=rank, world_size=world_size, device=device, sp=SPGroup.of(None), control=control)


class ShardedDiT:
    """Rank 0's sequence-parallel forward of one DiT expert: called like the model, runs it over every rank.

    `key` names the expert on every rank (the followers hold a model under the same key). `install`
    makes it the model's own forward, so whoever holds the module (the pipeline, its expert residency,
    a benchmark) runs it in parallel without knowing. Other attributes are the wrapped model's.
    """

    def __init__(self, model: torch.nn.Module, key: str, ctx: ParallelContext) -> None:
        check_world_size(model.cfg.num_heads, ctx.world_size, f"the DiT {key!r}")
        self.model = model
        self.key = key
        self.ctx = ctx
        self._forward = model.forward  # the model's own forward (bound before any install)

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    @classmethod
    def install(cls, model: torch.nn.Module, key: str, ctx: ParallelContext) -> "ShardedDiT":
        """Replace `model.forward` (on this instance) by the sharded forward; returns it."""
        sharded = cls(model, key, ctx)
        model.forward = sharded
        return sharded

    def __call__(self, x, t, context, y=None, *, attention=None, sla_topk=None, sp_group=None) -> torch.Tensor:
        ctx = self.ctx
        if sp_group is not None:  # already inside a parallel call: plain forward
            return self._forward(x, t, context, y, attention=attention, sla_topk=sla_topk, sp_group=sp_group)
        t = torch.as_tensor(t, device=x.device)
        tensors = {name: None if v is None else v.contiguous() for name, v in
                   (("x", x), ("t", t), ("context", context), ("y", y))}
        with ctx.lock:
            if ctx.broken:
                raise WorkerBroken(f"the sequence-parallel group is broken ({ctx.broken}); restart it")
            try:
                ctx.send("forward", expert=self.key, tensors=ctx.specs(tensors), attention=attention,
                         sla_topk=sla_topk)
                ctx.broadcast(tensors)
                ctx.forwards += 1
                return self._forward(tensors["x"], tensors["t"], tensors["context"], tensors["y"],
                                     attention=attention, sla_topk=sla_topk, sp_group=ctx.sp)
            except Exception as e:
                ctx.broken = f"{type(e).__name__}: {e}"[:300]
                raise WorkerBroken(f"a sequence-parallel forward failed ({ctx.broken}); the group must restart") from e
            except BaseException as e:
                ctx.broken = f"{type(e).__name__}: {e}"[:300]
                raise


def serve(ctx: ParallelContext, experts: dict[str, torch.nn.Module]) -> int:
    """A follower's loop: run every forward rank 0 commands until it says "exit". Returns the count."""
    with torch.inference_mode():
        while True:
            msg = ctx.recv()
            op = msg["op"]
            if op == "exit":
                log.info("rank %d: exit after %d forwards", ctx.rank, ctx.forwards)
                return ctx.forwards
            if op != "forward":
                raise SequenceParallelError(f"rank {ctx.rank}: unknown command {op!r}")
            tensors = ctx.receive(msg["tensors"])
            model = experts[msg["expert"]]
            model(tensors["x"], tensors["t"], tensors["context"], tensors["y"], attention=msg["attention"],
                  sla_topk=msg["sla_topk"], sp_group=ctx.sp)
            ctx.forwards += 1


# ------------------------------------------------------------------------------------------------
# what each rank loads
# ------------------------------------------------------------------------------------------------
def load_experts(
    model_id: str,
    *,
    models_dir: Path,
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    quant: Optional[str] = None,
) -> dict[str, torch.nn.Module]:
    """The DiT expert(s) of a preset exactly as `VideoPipeline.from_preset` loads them, without the text
    encoder and the VAE (ranks other than 0 only run the DiT). Keys: "dit", or "high" and "low"."""
    from turbodiffusion_core.pipeline import LoadPlan

    if quant == "auto":  # each rank would measure its own GPU and could choose differently
        raise ValueError("quant=auto is not available with several GPUs: choose none, int8 or fp8")
    plan = LoadPlan.prepare(model_id, models_dir, device, dtype, quant)
    return {name: plan.load_dit(role) for name, role in plan.expert_roles.items()}


def expert_key(model_id: str, name: str) -> str:
    """How an expert of a preset is named across ranks."""
    return f"{model_id}/{name}"


def shard_pipeline(pipe: Any, ctx: ParallelContext) -> Any:
    """Make every DiT expert of a rank-0 VideoPipeline run over all ranks (in place; returns the pipeline).

    The modules stay where they are (the pipeline and its expert residency keep handling them); only
    their forward becomes the sharded one (`ShardedDiT.install`)."""
    if getattr(pipe, "compile_dit", False):
        raise SequenceParallelError("torch.compile of the DiT is not supported with several GPUs yet")
    if getattr(pipe, "cuda_graphs", False):
        pipe.disable_cuda_graphs("sequence parallel (a graph would hold one rank's half of a collective)")
    for name, model in pipe.experts.items():
        ShardedDiT.install(model, expert_key(pipe.preset.id, name), ctx)
    pipe.sequence_parallel = ctx.world_size
    return pipe


def agree(ctx: ParallelContext, error: Optional[BaseException]) -> None:
    """Every rank says whether its setup worked; all raise if any failed (so none waits forever)."""
    mine = None if error is None else f"rank {ctx.rank}: {type(error).__name__}: {error}"
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine, group=ctx.control)
    failures = [e for e in everyone if e]
    if failures:
        if error is not None and isinstance(error, EngineError) and len(failures) == 1:
            raise error
        raise SequenceParallelError("; ".join(failures)) from error

