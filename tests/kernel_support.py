"""Shared by the Triton kernel tests (tests/test_kernels_*.py).

Their CPU tests run under Triton's interpreter, which is a property of a whole process (set before triton
is first imported), so each file has one ordinary test that runs every kernel test file once in a
separate interpreter process (the run is cached and shared) and checks its own lines of the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from turbodiffusion_core.kernels.triton_support import interpreting, pytest_under_interpreter

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TEST_FILES = tuple(sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/test_kernels_*.py")))
on_cpu = pytest.mark.skipif(not interpreting(), reason="runs in test_cpu_kernels_in_interpreter's process")
on_gpu = pytest.mark.skipif(interpreting() or not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_interpreter_run(test_file: str) -> None:
    """Assert that test_file's CPU tests passed in the shared interpreter process (skip inside it)."""
    if interpreting():
        pytest.skip("this is the interpreter process")
    report = pytest_under_interpreter(KERNEL_TEST_FILES, str(ROOT))
    mine = Path(test_file).resolve().relative_to(ROOT).as_posix()
    assert f"PASSED {mine}::" in report, report[-6000:]
    assert f"FAILED {mine}" not in report and f"ERROR {mine}" not in report, report[-6000:]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def qkv(batch: int, length: int, heads: int, dim: int, dtype=torch.float16, device="cpu", seed: int = 0):
    """Random SLA inputs [B, L, H, D] for the attention kernels' tests."""
    gen = torch.Generator(device).manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dim, generator=gen, device=device) for _ in range(2))
    # A per-channel offset in v makes the linear branch (a weighted mean of all values) large enough to see.
    v = torch.randn(batch, length, heads, dim, generator=gen, device=device)
    v = v + torch.randn(dim, generator=gen, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_proj(dim: int, dtype=torch.float16, device="cpu", seed: int = 1) -> torch.nn.Linear:
    """A random SLA `proj_l` (head_dim x head_dim, with bias)."""
    torch.manual_seed(seed)
    proj = torch.nn.Linear(dim, dim, device=device)
    with torch.no_grad():
        proj.weight.normal_(0.0, dim**-0.5)
        proj.bias.normal_(0.0, 0.1)
    return proj.to(dtype)


def enliven_dit(model: torch.nn.Module) -> torch.nn.Module:
    """Give a freshly built DiT non-trivial adaLN modulation and SLA `proj_l` weights (their initial values
    are small or zero, which would hide mistakes in the paths that use them)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation") or "proj_l" in name:
                p.normal_(0, 0.05)
    return model


def dit_forward(model: torch.nn.Module, inputs: tuple, *, fused: bool, **kw) -> torch.Tensor:
    """One inference forward with the DiT's fused Triton block path on or off (TD_NO_FUSED)."""
    before = os.environ.get("TD_NO_FUSED")
    os.environ["TD_NO_FUSED"] = "0" if fused else "1"
    try:
        with torch.inference_mode():
            return model(*inputs, **kw)
    finally:
        if before is None:
            os.environ.pop("TD_NO_FUSED", None)
        else:
            os.environ["TD_NO_FUSED"] = before
