"""Self-attention backends behind one call signature, chosen per request.

Every backend is a function

    fn(q, k, v, *, proj_l=None, topk=0.1) -> out

with q, k, v and out laid out as **[B, L, H, D]** (batch, tokens, heads, head_dim): the layout the
q/k/v projections produce with a free `view`, so no backend forces a copy before or after it. `proj_l`
is the layer's SLA linear-branch projection (TurboDiffusion checkpoints) and `topk` the fraction of key
blocks SLA keeps; dense attention ignores both.

Names (`spec.ATTENTION_TYPES` plus the reference):
- "original": dense softmax attention through torch SDPA (flash / cuDNN on the GPU).
- "sla_reference": the pure-PyTorch SLA formula (sla_reference.py), the ground truth for kernels.
- "sla": SLA through the fused Triton kernel (attention/sla_triton.py) on CUDA; the reference elsewhere.
- "sagesla": SLA with the sparse branch on SpargeAttn's INT8-QK / FP8-PV kernels (attention/sagesla.py);
  needs a CUDA GPU and the `spas_sage_attn` package, and says how to get it when they are missing.
- "auto": on CUDA, for a model that carries SLA projections (its weights were fine-tuned for SLA),
  "sagesla" where spas_sage_attn loads (measured faster: bench/results/dit_h100.json), for the shapes its
  kernels take, with "sla" for the rest; "sla" where it does not load; else "original". The choice is
  logged.

Because the choice is a plain function looked up by name, a request can switch backend (and top-k)
on every forward without rebuilding the model.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Optional, Protocol

from turbodiffusion_core.errors import EngineError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "original", "sla", "sla_reference", "sagesla")

SAGESLA_INSTALL_HINT = (
    "pip install git+https://github.com/thu-ml/SpargeAttn.git --no-build-isolation (needs a CUDA GPU), "
    "or use attention_type=sla"
)


class AttentionFn(Protocol):
    def __call__(
        self,
        q: "torch.Tensor",
        k: "torch.Tensor",
        v: "torch.Tensor",
        *,
        proj_l: Optional["nn.Linear"] = None,
        topk: float = 0.1,
    ) -> "torch.Tensor": ...


class AttentionUnavailable(EngineError):
    """The requested attention backend cannot run here; the message says how to get it or what to use."""

    code = "attention_unavailable"


_warned: set[str] = set()
_last_auto_choice: dict[tuple[str, bool], str] = {}


def resolve_attention(name: str, *, device_type: str, has_sla_proj: bool) -> str:
    """Map a requested name (including "auto") to a concrete backend name; unknown names raise ValueError."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention type {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        return name
    if device_type == "cuda" and has_sla_proj:
        sage_missing = _sagesla_unavailable_reason(device_type)
        choice = "sla" if sage_missing else "sagesla"
        why = "the model has SLA projections; " + (
            "spas_sage_attn is not usable, so our Triton kernel" if sage_missing
            else "spas_sage_attn loads (sla where its kernels cannot take the shape)"
        )
    else:
        choice, why = "original", "dense attention is fastest here"
    key = (device_type, has_sla_proj)
    if _last_auto_choice.get(key) != choice:
        _last_auto_choice[key] = choice
        log.info("attention auto -> %s on %s (%s)", choice, device_type, why)
    return choice


def get_backend(name: str, *, device_type: str = "cpu", has_sla_proj: bool = False) -> AttentionFn:
    """The attention function for a backend name (after resolving "auto")."""
    concrete = resolve_attention(name, device_type=device_type, has_sla_proj=has_sla_proj)
    if concrete == "original":
        from turbodiffusion_core.attention.sdpa import sdpa_attention

        return sdpa_attention
    if concrete == "sagesla":
        reason = _sagesla_unavailable_reason(device_type)
        if reason is not None:
            raise AttentionUnavailable(reason)
        from turbodiffusion_core.attention.sagesla import sagesla, sagesla_or_sla

        return sagesla_or_sla if name == "auto" else sagesla
    from turbodiffusion_core.attention.sla_reference import sla_reference

    if concrete == "sla" and device_type == "cuda":
        from turbodiffusion_core.kernels.triton_support import triton_installed

        if triton_installed():
            from turbodiffusion_core.attention.sla_triton import sla_triton

            return sla_triton
        if "sla" not in _warned:
            _warned.add("sla")
            log.warning("attention sla: Triton is not installed; running the PyTorch reference (slow)")
    return sla_reference


def _sagesla_unavailable_reason(device_type: str) -> Optional[str]:
    """Why "sagesla" cannot run on this device type (None when it can), with the way to fix it."""
    if device_type != "cuda":
        return f"attention_type=sagesla runs only on a CUDA GPU with SpargeAttn: {SAGESLA_INSTALL_HINT}"
    if importlib.util.find_spec("spas_sage_attn") is None:
        return f"attention_type=sagesla needs the spas_sage_attn package: {SAGESLA_INSTALL_HINT}"
    from turbodiffusion_core.kernels.triton_support import triton_installed

    if not triton_installed():
        return "attention_type=sagesla needs Triton (pip install triton), or use attention_type=sla"
    from turbodiffusion_core.attention.sagesla import spas_import_error

    error = spas_import_error()
    if error is not None:
        return f"attention_type=sagesla: spas_sage_attn fails to load ({error}); {SAGESLA_INSTALL_HINT}"
    return None


__all__ = [
    "AttentionFn",
    "AttentionUnavailable",
    "BACKEND_NAMES",
    "get_backend",
    "resolve_attention",
]
