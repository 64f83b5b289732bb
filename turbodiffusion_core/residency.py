"""Where the DiT experts of a pipeline live: all on the GPU ("resident") or one at a time ("swap").

Wan2.2 I2V A14B runs a high-noise expert for the first steps and a low-noise expert for the rest. When
both fit (fp8 / int8 copies: 2 x ~14 GB) they stay on the GPU and the switch costs nothing. When they do
not, the idle expert waits in pinned host memory and the switch is streamed so that it hides under
compute:

- During the last step of the outgoing expert, a forward hook on each of its DiT blocks frees that
  block's GPU weights as soon as the block has been queued and starts copying the incoming expert's
  matching block into the freed memory (a non_blocking host-to-device copy on a side CUDA stream that
  waits for the compute queued so far). The block-by-block hand-over keeps peak memory at about one
  expert plus one block, and the copies (14-28 GB at 25-50 GB/s) run while the remaining blocks of
  the step compute.
- Weights never change during inference, so moving an expert out is free: its pinned host copy is
  always valid and the GPU tensors are simply dropped (no device-to-host copy).
- The compute stream waits for the copy stream before the incoming expert's first forward (an event
  wait on the GPU, not a host stall); `stats()["stall_ms"]` reports how long that wait held compute.
- After the last step of a request the first ("home") expert is streamed back the same way, so the
  next request starts without a switch.

On a CPU pipeline the same code path runs: "device" copies are ordinary copies, made synchronously.
Units (the tensors moved together) are the DiT's blocks plus one unit for everything else; a module
without `blocks` is one unit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("turbodiffusion.residency")

MODES = ("auto", "resident", "swap")
_ALIGN = 256  # byte alignment of every tensor inside a unit's flat buffer


@dataclass
class _Slot:
    """One parameter or buffer of a unit: where it sits in the module tree and in the flat buffers."""

    module: nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            getattr(self.module, self.name).data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name) if self.is_param else self.module._buffers[self.name]


class _Unit:
    """Tensors moved together. `host` is the flat (pinned, on CUDA) copy; state is "device" or "host"."""

    def __init__(self, modules: list[nn.Module], skip: tuple[nn.Module, ...] = ()):
        skipped = {id(m) for s in skip for m in s.modules()}
        self.slots: list[_Slot] = []
        self._first: dict[int, _Slot] = {}  # tensor id -> first slot (a tensor tied in two places moves once)
        self._aliases: list[tuple[_Slot, _Slot]] = []
        offset = 0
        for root in modules:
            for mod in root.modules():
                if id(mod) in skipped:
                    continue
                entries = [(n, p, True) for n, p in mod._parameters.items() if p is not None]
                entries += [(n, b, False) for n, b in mod._buffers.items() if b is not None]
                for name, tensor, is_param in entries:
                    slot = _Slot(mod, name, is_param, tensor.dtype, tensor.shape, offset,
                                 tensor.numel() * tensor.element_size())
                    if id(tensor) in self._first:
                        self._aliases.append((slot, self._first[id(tensor)]))
                        continue
                    self._first[id(tensor)] = slot
                    self.slots.append(slot)
                    offset += -(-slot.nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.host: Optional[torch.Tensor] = None
        self.state = "device"

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots]

    def _assign(self, tensors: list[torch.Tensor]) -> None:
        for slot, tensor in zip(self.slots, tensors):
            slot.set(tensor)
        for alias, first in self._aliases:
            alias.set(first.get())

    def make_host_copy(self, host: torch.Tensor) -> None:
        """Copy the unit's current tensors (wherever they are) into `host`, a flat uint8 host buffer of
        at least `nbytes` (a slice of the expert's one pinned allocation)."""
        self.host = host
        with torch.inference_mode(False), torch.no_grad():
            for slot, view in zip(self.slots, self._views(host)):
                view.copy_(slot.get().detach().contiguous())

    def to_host(self) -> None:
        """Point every tensor at the host copy; the device tensors are freed (weights never change)."""
        self._assign(self._views(self.host))
        self.state = "host"

    def to_device(self, device: torch.device, stream: Optional["torch.cuda.Stream"]) -> None:
        """Allocate on the current stream, copy on `stream` (after the work queued so far), or copy now.
        (Normal tensors even inside inference_mode: they become parameters that outlive the request.)"""
        with torch.inference_mode(False), torch.no_grad():
            flat = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device=device)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    flat.copy_(self.host, non_blocking=True)
            else:
                flat.copy_(self.host)
            self._assign(self._views(flat))
        self.state = "device"


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when 0 is the current one."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def units_of(model: nn.Module) -> list[_Unit]:
    """The model's DiT blocks, one unit each, then everything else as one unit."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return [_Unit([b]) for b in blocks] + [_Unit([model], skip=(blocks,))]
    return [_Unit([model])]


def module_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def choose_mode(requested: str, *, experts: int, expert_bytes: int, free_bytes: Optional[int],
                reserve_bytes: int) -> tuple[str, str]:
    """("resident" | "swap", why). `free_bytes` is the free device memory with one expert already
    loaded (None: not a GPU, everything fits). "auto" keeps every expert on the device when the others
    fit next to `reserve_bytes` of working memory (activations, VAE decode)."""
    if requested not in MODES:
        raise ValueError(f"expert residency must be one of {', '.join(MODES)}; got {requested!r}")
    if requested != "auto":
        return requested, "configured"
    if experts <= 1:
        return "resident", "one expert"
    if free_bytes is None:
        return "resident", "not a GPU"
    need = (experts - 1) * expert_bytes + reserve_bytes
    gib = 2**30
    if free_bytes >= need:
        return "resident", f"free {free_bytes / gib:.1f} GiB >= {need / gib:.1f} GiB needed"
    return "swap", f"free {free_bytes / gib:.1f} GiB < {need / gib:.1f} GiB needed for all experts"


class ExpertResidency:
    """Keeps the right expert on the device. `experts` maps name -> module; the first name is "home"
    (the expert a request starts with). In "swap" mode every expert but home goes to host memory now."""

    def __init__(self, experts: dict[str, nn.Module], device: torch.device, mode: str = "resident",
                 reason: str = "configured"):
        if mode not in ("resident", "swap"):
            raise ValueError(f"mode must be 'resident' or 'swap'; got {mode!r}")
        self.experts = experts
        self.device = torch.device(device)
        self.mode = mode
        self.reason = reason
        self.home = next(iter(experts))
        self._cuda = self.device.type == "cuda"
        self._stream = None
        self._pending: set[int] = set()  # ids of units whose copy compute has not waited for yet
        self._hooks: list = []
        self._stall_events: list[tuple] = []
        self._stats = {"switches": 0, "units_copied": 0, "bytes_copied": 0, "stall_ms": 0.0, "sync_loads": 0}
        self.units: dict[str, list[_Unit]] = {}
        if mode == "swap" and len(experts) > 1:
            start = time.perf_counter()
            if self._cuda:
                self._stream = torch.cuda.Stream(self.device)
            for name, model in experts.items():
                units = units_of(model)
                # one pinned allocation per expert: PyTorch's pinned-memory cache rounds every allocation
                # up to a power of two, which per block would waste up to half of the host memory
                with torch.inference_mode(False):
                    host = torch.empty(max(1, sum(u.nbytes for u in units)), dtype=torch.uint8,
                                       pin_memory=self._cuda)
                offset = 0
                for unit in units:
                    unit.make_host_copy(host[offset:offset + max(unit.nbytes, 1)])
                    offset += unit.nbytes
                    if name == self.home:
                        if unit.slots and not same_device(unit.slots[0].get().device, self.device):
                            unit.to_device(self.device, None)
                    else:
                        unit.to_host()
                self.units[name] = units
            if self._cuda:
                torch.cuda.empty_cache()
            log.info("expert swap mode: %s on %s, %s in %s host memory (%.1f GiB, prepared in %.1f s)", self.home,
                     self.device, ", ".join(n for n in experts if n != self.home),
                     "pinned" if self._cuda else "plain", self.host_bytes() / 2**30, time.perf_counter() - start)
        elif mode == "swap":
            self.mode, self.reason = "resident", "one expert"

    # -- queries -------------------------------------------------------------------------------------
    @property
    def swapping(self) -> bool:
        return bool(self.units)

    def on_device(self, name: str) -> bool:
        """Whether every tensor of `name` is on the device (always true in resident mode)."""
        return not self.swapping or all(u.state == "device" for u in self.units[name])

    def host_bytes(self) -> int:
        return sum(u.nbytes for units in self.units.values() for u in units)

    def stats(self) -> dict:
        self._collect_stalls()
        out = dict(self._stats)
        out["stall_ms"] = round(out["stall_ms"], 3)
        return out

    def describe(self) -> dict:
        out = {"mode": self.mode, "reason": self.reason, "home": self.home}
        if self.swapping:
            out["host_gb"] = round(self.host_bytes() / 2**30, 3)
            out["on_device"] = [n for n in self.experts if self.on_device(n)]
        return out

    # -- moves ---------------------------------------------------------------------------------------
    def _wait_copies(self) -> None:
        """Make compute wait for the copies queued so far (a GPU-side wait, timed with events)."""
        if not self._pending:
            return
        self._pending.clear()
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            before.record(current)
            current.wait_stream(self._stream)
            after.record(current)
            self._stall_events.append((before, after))

    def _collect_stalls(self) -> None:
        done = []
        for before, after in self._stall_events:
            if after.query():
                self._stats["stall_ms"] += before.elapsed_time(after)
                done.append((before, after))
        self._stall_events = [e for e in self._stall_events if e not in done]

    def _release(self, unit: _Unit) -> None:
        if unit.state == "device":
            if id(unit) in self._pending:
                self._wait_copies()  # never free memory a queued copy may still be writing
            unit.to_host()

    def _load(self, unit: _Unit) -> None:
        if unit.state == "host":
            unit.to_device(self.device, self._stream)
            if self._stream is not None:
                self._pending.add(id(unit))
            self._stats["units_copied"] += 1
            self._stats["bytes_copied"] += unit.nbytes

    def ensure(self, name: str) -> None:
        """Make `name` fully resident (the others leave first) and let compute wait for its copies."""
        if not self.swapping:
            return
        if not self.on_device(name):
            self._stats["sync_loads"] += 1
            for other, units in self.units.items():
                if other != name:
                    for unit in units:
                        self._release(unit)
            for unit in self.units[name]:
                self._load(unit)
        self._wait_copies()

    def load_all(self) -> None:
        """Every expert onto the device (leaving swap mode)."""
        for units in self.units.values():
            for unit in units:
                self._load(unit)
        self._wait_copies()

    def arm_switch(self, src: str, dst: str) -> None:
        """During src's next forward, hand the device over to dst block by block (see module doc)."""
        if not self.swapping or src == dst:
            return
        self.disarm()
        src_units, dst_units = self.units[src], self.units[dst]
        model = self.experts[src]
        blocks = getattr(model, "blocks", None)
        paired = isinstance(blocks, nn.ModuleList) and len(blocks) == len(src_units) - 1 == len(dst_units) - 1
        self._stats["switches"] += 1
        if paired:
            for k, block in enumerate(blocks):
                def after_block(module, args, output, k=k):
                    self._release(src_units[k])
                    self._load(dst_units[k])
                self._hooks.append(block.register_forward_hook(after_block))

        def after_model(module, args, output):
            for unit in src_units:
                self._release(unit)
            for unit in dst_units:
                self._load(unit)
            self.disarm()

        self._hooks.append(model.register_forward_hook(after_model))

    def disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def settle(self) -> None:
        """After a request (also one that failed mid-switch): no hooks left. Copies still in flight are
        waited for lazily (by `ensure` before the next forward, or before their memory is freed), so
        the VAE decode that follows does not wait for the home expert streaming back in."""
        self.disarm()
