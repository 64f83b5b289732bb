"""Where Triton kernels can run, interpreter-safe autotuning, and interpreter runs for CPU tests.

Triton compiles kernels for the GPU; with TRITON_INTERPRET=1 it instead runs them on CPU tensors through
numpy, which is how the kernels are tested on machines without a GPU. Two facts about the interpreter
shape this module:
- Triton decides *when a function is decorated* (module import, triton's own library included) whether
  it is compiled or interpreted, so interpreter mode is a property of a whole process that sets
  TRITON_INTERPRET before it first imports triton: `run_under_interpreter` starts such a process, which
  also keeps interpreter mode from leaking into anything else.
- `triton.autotune` times its candidates on a GPU and so cannot run under the interpreter; `autotune()`
  here falls back to the first candidate there.

This module imports neither torch nor triton at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    import torch

INTERPRET_ENV = "TRITON_INTERPRET"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET set)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_usable(*tensors: "torch.Tensor") -> bool:
    """Whether the Triton kernels can run on these tensors here.

    Yes for CUDA tensors when Triton is installed, and for CPU tensors under the interpreter. Callers use
    it to pick between a kernel and its PyTorch reference.
    """
    if not triton_installed():
        return False
    wanted = "cpu" if interpreting() else "cuda"
    return all(t.device.type == wanted for t in tensors)


@functools.lru_cache(maxsize=8)
def num_sms(device: "torch.device") -> int:
    """Streaming multiprocessors of a CUDA device, which sizes grids (1 elsewhere: the interpreter runs one
    program at a time)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


class _FirstConfig:
    """Stands in for an autotuned kernel under the interpreter: launches with the first config's values."""

    def __init__(self, kernel: Any, config: Any) -> None:
        self.kernel = kernel
        self.config = config

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if self.config.pre_hook is not None:  # as triton.autotune does before a launch
                self.config.pre_hook({**dict(zip(self.kernel.arg_names, args)), **kwargs, **self.config.kwargs})
            return self.kernel[grid](*args, **self.config.kwargs, **kwargs)

        return launch


def autotune(configs: Sequence[Any], key: Sequence[str]) -> Callable[[Any], Any]:
    """`triton.autotune(configs, key)` on a GPU; under the interpreter, the first config (see module doc)."""

    def wrap(kernel: Any) -> Any:
        if interpreting():
            return _FirstConfig(kernel, configs[0])
        import triton

        return triton.autotune(configs=list(configs), key=list(key))(kernel)

    return wrap


def run_under_interpreter(
    args: Sequence[str], *, timeout: float, cwd: Optional[str] = None
) -> "subprocess.CompletedProcess[str]":
    """Run `python <args>` in a fresh process with TRITON_INTERPRET=1 and no visible GPU; output captured.

    The variable has to be set before that process imports triton (see the module docstring), which is
    why interpreter runs (the CPU kernel tests) get a process of their own.
    """
    env = {**os.environ, INTERPRET_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@functools.cache
def pytest_under_interpreter(test_files: tuple[str, ...], rootdir: str) -> str:
    """Run these pytest files once per process under the interpreter and return the `-rA` report.

    Cached so that several test modules can share one interpreter process (its start-up, about as long
    as the tests themselves, is paid once) and each read its own PASSED / FAILED lines from the report.
    """
    run = run_under_interpreter(  # the kernel tests need no shared fixtures: skip conftest.py and its imports
        ["-m", "pytest", *test_files, "-q", "-rA", "-p", "no:cacheprovider", "--noconftest"], timeout=600, cwd=rootdir
    )
    return run.stdout + run.stderr
