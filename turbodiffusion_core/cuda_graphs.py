"""CUDA graphs of the DiT forward: the launches of one forward (about a thousand kernels at 1.3B) recorded
once per input signature and replayed, so the GPU never waits on Python between kernels.

`GraphedForward(model)` is called like the model. Per signature (the shapes, dtypes and devices of the
tensor arguments, and the values of the others, e.g. attention backend and SLA top-k):
- the first call runs eagerly (Triton autotuning, cuDNN / cuBLAS set-up and lazy caches happen there,
  outside any capture);
- the second call captures the forward into a graph with static copies of its tensor inputs, then replays;
- later calls copy their inputs into the static tensors, replay, and return a copy of the static output
  (so the caller owns its result and the next replay cannot change it).
A capture that fails (an operation that cannot be recorded, e.g. a host synchronisation) is logged once
and that signature runs eagerly from then on. CPU tensors, and calls with autograd on, always run eagerly.

All graphs of one GraphedForward (and of others given the same `pool`) share one memory pool: graphs never
run concurrently here and nothing is read from a graph's memory after the next replay (inputs are copied
in, outputs copied out), so sharing is safe and the pool is as large as one forward's activations, which
stay reserved for the graphs (the memory figures in the README say what that costs). Weights must stay
where they are while a graph exists: the pipeline does not use graphs when experts swap (moving weights),
and `reset()` drops every graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import torch

log = logging.getLogger("turbodiffusion.cuda_graphs")


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]  # the static tensor inputs, in `_signature` order: copied into before each replay
    output: torch.Tensor


def _signature(args: tuple, kwargs: dict) -> tuple[Hashable, list[torch.Tensor]]:
    """(hashable key, tensor arguments in order): a tensor stands for its shape, dtype and device."""
    key: list = []
    tensors: list[torch.Tensor] = []
    for name, value in [(None, a) for a in args] + sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            key.append((name, "tensor", tuple(value.shape), value.dtype, str(value.device)))
        else:
            key.append((name, value))
    return tuple(key), tensors


def _hashable(key: Hashable) -> bool:
    """Whether a signature can key a graph (an argument such as a list cannot: that call runs eagerly)."""
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _recover_from_failed_capture() -> None:
    """A capture that raised never ran its end step for CUDA's default random generator, which stays in
    capture mode (its next random draw outside a capture fails); one small capture that completes runs the
    begin and end steps and puts it back."""
    torch.cuda.synchronize()
    scratch = torch.zeros(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scratch.add_(1)
    torch.cuda.synchronize()


def _static_copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class GraphedForward:
    """A callable that runs `fn` through CUDA graphs where it can (see the module docstring)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, pool: Optional[tuple] = None, name: str = "dit",
                 max_graphs: int = 8) -> None:
        self.fn = fn
        self.name = name
        self.max_graphs = max_graphs
        self.pool = pool
        self.graphs: dict[Hashable, _Graph] = {}
        self.seen: set[Hashable] = set()
        self.failed: dict[Hashable, str] = {}
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        key, tensors = _signature(args, kwargs)
        if not tensors or not all(t.is_cuda for t in tensors) or torch.is_grad_enabled() or not _hashable(key) \
                or key in self.failed:
            return self.fn(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.fn(*args, **kwargs)  # the eager first run (or no room for another graph)
            entry = self._capture(key, args, kwargs)
            if entry is None:
                return self.fn(*args, **kwargs)
        for static, value in zip(entry.inputs, tensors):
            static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, key: Hashable, args: tuple, kwargs: dict) -> Optional[_Graph]:
        static_args = [_static_copy(a) for a in args]
        static_kwargs = {k: _static_copy(v) for k, v in kwargs.items()}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.fn(*static_args, **static_kwargs)
        except Exception as e:  # this signature runs eagerly from now on
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning("%s: CUDA graph capture failed, running eagerly for these inputs (%s)", self.name,
                        self.failed[key][:300])
            _recover_from_failed_capture()
            return None
        if not isinstance(output, torch.Tensor):
            self.failed[key] = f"the forward returned {type(output).__name__}, not a tensor"
            return None
        entry = _Graph(graph, _signature(tuple(static_args), static_kwargs)[1], output)
        self.graphs[key] = entry
        log.info("%s: captured a CUDA graph (%d so far) for %s", self.name, len(self.graphs),
                 ", ".join(str(tuple(t.shape)) for t in entry.inputs))
        return entry

    def reset(self) -> None:
        """Drop every graph (their memory returns to the pool) and forget what was seen."""
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "failed": len(self.failed)}
