"""Start the ranks of a sequence-parallel pipeline: under torchrun, or by spawning them from this process.

    group = start_group(["turbowan2.1-t2v-14b-720p"], gpus=[0, 1, 2, 3])   # this process is rank 0
    result = group.pipelines["turbowan2.1-t2v-14b-720p"].generate(request, on_progress=..., should_cancel=...)
    group.close()                                                           # also done at exit

Two ways to get N ranks:
- spawn (the default): this process becomes rank 0 on gpus[0]; N-1 follower processes are started with
  torch.multiprocessing ("spawn", daemonic, each on its GPU; they exit if this process disappears).
  `world_size=N, device="cpu"` does the same with gloo on the CPU (tests).
- torchrun: `torchrun --nproc-per-node N -m turbodiffusion generate --gpus 0,1,2,3 ...`: every process
  calls start_group; rank 0 gets the group, the others serve rank 0 inside the call and get None back
  once rank 0 closes the group (they have nothing else to do and should exit).

Rank 0 loads the whole pipeline (text encoder, VAE, DiT); the others only the DiT experts. Every rank
reports whether its load worked before any job runs, so a missing file or a bad GPU count fails at
start on every rank with one message.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from turbodiffusion_core import spec
from turbodiffusion_core.parallel.runtime import (
    ParallelContext,
    ShardedDiT,
    agree,
    expert_key,
    init_ranks,
    load_experts,
    serve,
    shard_pipeline,
)
from turbodiffusion_core.parallel.ulysses import SequenceParallelError, check_world_size

log = logging.getLogger("turbodiffusion.parallel")


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of several started by torchrun (or another env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def parse_gpus(gpus: Optional[str | Sequence[int]]) -> Optional[tuple[int, ...]]:
    """"0,1,2,3" (or a list) -> (0, 1, 2, 3); None stays None."""
    if gpus is None or gpus == "":
        return None
    if isinstance(gpus, str):
        try:
            out = tuple(int(g) for g in gpus.replace(" ", "").split(",") if g != "")
        except ValueError:
            raise SequenceParallelError(
                f"--gpus takes GPU indices separated by commas, e.g. 0,1,2,3; got {gpus!r}") from None
    else:
        out = tuple(int(g) for g in gpus)
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise SequenceParallelError(f"--gpus needs distinct GPU indices, got {gpus!r}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class GroupSpec:
    """What every rank of a group loads and where it runs (picklable: it is sent to spawned ranks)."""

    models: tuple[str, ...]
    models_dir: str
    world_size: int
    device_type: str  # "cuda" or "cpu"
    gpus: Optional[tuple[int, ...]] = None
    attention: str = "auto"
    quant: Optional[str] = None
    dtype: Optional[str] = None  # "bfloat16", "float32"; None: the pipeline's default for the device
    extra_experts: Optional[str] = None
    """"module:function" every rank calls with its device to get more {key: WanModel} to serve, built the
    same on every rank (tests use it for random-weight models)."""

    def device_of(self, local_rank: int) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", self.gpus[local_rank] if self.gpus else local_rank)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(torch, self.dtype) if self.dtype else None


def _extra_experts(path: Optional[str], device: torch.device) -> dict[str, torch.nn.Module]:
    if not path:
        return {}
    module, _, name = path.partition(":")
    return dict(getattr(importlib.import_module(module), name)(device))


class ParallelGroup:
    """Rank 0's handle on a running group: the pipelines (their DiTs sharded over every rank)."""

    def __init__(self, ctx: ParallelContext, spec_: GroupSpec, pipelines: dict[str, Any],
                 extra: dict[str, ShardedDiT], processes: list) -> None:
        self.ctx = ctx
        self.spec = spec_
        self.pipelines = pipelines
        self.extra = extra
        self.processes = processes
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def broken(self) -> Optional[str]:
        return self.ctx.broken

    def close(self, timeout: float = 30.0) -> None:
        """Tell the other ranks to exit, wait for the spawned ones, leave the process group."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        ctx = self.ctx
        if not ctx.broken:
            try:
                with ctx.lock:
                    ctx.send("exit")
            except Exception as e:  # a rank already gone: nothing more to tell it
                log.warning("could not tell the other ranks to exit: %s", e)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if not ctx.broken and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "ParallelGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_group(
    models: Sequence[str],
    *,
    gpus: Optional[str | Sequence[int]] = None,
    world_size: Optional[int] = None,
    device: str = "auto",
    models_dir: Optional[Path] = None,
    attention: str = "auto",
    quant: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    extra_experts: Optional[str] = None,
) -> Optional[ParallelGroup]:
    """Bring up every rank with the given models resident (see the module docstring).

    Args:
        models: preset ids; each rank loads their DiTs (rank 0 the whole pipelines).
        gpus: GPU indices, one rank each ("0,1,2,3"); under torchrun, local rank i uses gpus[i]
            (default: GPU = local rank).
        world_size: number of ranks when not given by gpus or torchrun (e.g. 2 with device="cpu").
        device: "auto" (CUDA when there is a GPU), "cuda" or "cpu".
    Returns the group on rank 0; None on the other torchrun ranks, after rank 0 closed the group.
    """
    from turbodiffusion_core.models.configs import DIT_CONFIGS
    from turbodiffusion_core.pipeline import default_models_dir

    gpu_list = parse_gpus(gpus)
    torchrun = launched_by_torchrun()
    if torchrun:
        n = int(os.environ["WORLD_SIZE"])
        if gpu_list is not None and len(gpu_list) != int(os.environ.get("LOCAL_WORLD_SIZE", n)):
            raise SequenceParallelError(f"--gpus lists {len(gpu_list)} GPUs but torchrun started "
                                        f"{os.environ.get('LOCAL_WORLD_SIZE', n)} processes on this node")
    elif gpu_list is not None:
        n = len(gpu_list)
    elif world_size is not None:
        n = world_size
    else:
        raise ValueError("say how many ranks: gpus=..., world_size=..., or run under torchrun")
    if world_size is not None and world_size != n:
        raise ValueError(f"world_size {world_size} does not match the {n} ranks given")
    if device == "auto":
        device = "cuda" if (gpu_list is not None or torch.cuda.is_available()) else "cpu"
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SequenceParallelError("GPUs were asked for but CUDA is not available here")
    if device_type == "cuda" and gpu_list is not None and max(gpu_list) >= torch.cuda.device_count():
        raise SequenceParallelError(f"--gpus {','.join(map(str, gpu_list))}: this machine has "
                                    f"{torch.cuda.device_count()} visible GPUs")
    for model in models:  # fail before anything starts
        check_world_size(DIT_CONFIGS[spec.get_preset(model).arch].num_heads, n, model)

    group_spec = GroupSpec(
        models=tuple(models), models_dir=str(models_dir or default_models_dir()), world_size=n,
        device_type=device_type, gpus=gpu_list, attention=attention, quant=quant,
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None, extra_experts=extra_experts,
    )
    if torchrun:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        ctx = init_ranks(rank, n, device=group_spec.device_of(local_rank))
        if rank != 0:
            try:
                follow(ctx, group_spec)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
            return None
        return _lead(ctx, group_spec, [])

    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp = torch.multiprocessing.get_context("spawn")
    processes = [
        mp.Process(target=_follower_main, args=(rank, group_spec, init_method, os.getpid()), daemon=True,
                   name=f"turbodiffusion-sp-rank{rank}")
        for rank in range(1, n)
    ]
    for proc in processes:
        proc.start()
    try:
        ctx = init_ranks(0, n, device=group_spec.device_of(0), init_method=init_method)
    except BaseException:
        for proc in processes:
            proc.terminate()
        raise
    return _lead(ctx, group_spec, processes)


def _lead(ctx: ParallelContext, group_spec: GroupSpec, processes: list) -> ParallelGroup:
    """Rank 0: load the pipelines, agree with the others that everyone is ready."""
    from turbodiffusion_core.pipeline import load_pipeline

    pipelines: dict[str, Any] = {}
    extra: dict[str, ShardedDiT] = {}
    error: Optional[BaseException] = None
    try:
        for model in group_spec.models:
            pipe = load_pipeline(model, models_dir=Path(group_spec.models_dir), device=str(ctx.device),
                                 attention=group_spec.attention, quant=group_spec.quant,
                                 dtype=group_spec.torch_dtype)
            pipelines[model] = shard_pipeline(pipe, ctx)
        extra = {key: ShardedDiT(m, key, ctx)
                 for key, m in _extra_experts(group_spec.extra_experts, ctx.device).items()}
    except Exception as e:
        error = e
    try:
        agree(ctx, error)
    except BaseException:
        ctx.broken = "a rank failed to start"
        for proc in processes:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    group = ParallelGroup(ctx, group_spec, pipelines, extra, processes)
    atexit.register(group.close)
    log.info("sequence-parallel group of %d ranks ready: %s", ctx.world_size, ", ".join(group_spec.models))
    return group


def follow(ctx: ParallelContext, group_spec: GroupSpec) -> int:
    """A follower rank: load the DiT experts, report, then serve rank 0 until it closes the group."""
    experts: dict[str, torch.nn.Module] = {}
    error: Optional[BaseException] = None
    try:
        for model in group_spec.models:
            for name, dit in load_experts(model, models_dir=Path(group_spec.models_dir), device=ctx.device,
                                          dtype=group_spec.torch_dtype, quant=group_spec.quant).items():
                experts[expert_key(model, name)] = dit  # attention comes with every command
        experts.update(_extra_experts(group_spec.extra_experts, ctx.device))
    except Exception as e:
        error = e
    agree(ctx, error)
    return serve(ctx, experts)


def _watch_parent(parent_pid: int) -> None:
    """End this follower if the process that spawned it is gone (it can no longer be told to exit)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _follower_main(rank: int, group_spec: GroupSpec, init_method: str, parent_pid: int) -> None:
    _watch_parent(parent_pid)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if group_spec.device_type == "cpu" and os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ctx = init_ranks(rank, group_spec.world_size, device=group_spec.device_of(rank), init_method=init_method)
    try:
        follow(ctx, group_spec)
    except SequenceParallelError as e:  # a start failure: rank 0 raises it too, with every rank's reason
        log.error("%s", e)
        return
    finally:
        if dist.is_initialized() and not ctx.broken:
            dist.destroy_process_group()


def parallel_pipeline(model: str, *, gpus: Optional[str | Sequence[int]] = None, **kwargs: Any) -> Optional[Any]:
    """For the CLI: the rank-0 pipeline of `model` over `gpus` (or the torchrun ranks); None on other ranks."""
    group = start_group([model], gpus=gpus, **kwargs)
    return None if group is None else group.pipelines[model]
