"""The pipelines a worker keeps resident: built once at start, used by every job after.

Loading a model is the expensive part (seconds for the tiny presets, minutes for 14B weights),
so a worker loads its models before it takes its first job and never unloads them. A lock per
pipeline makes sure two threads sharing a Residency (an in-process worker restarted in tests,
say) never run the same modules at once: the engine's modules keep per-call state such as the
VAE's feature cache.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from turbodiffusion_core.errors import EngineError

log = logging.getLogger("turbodiffusion.worker")


class NotResident(EngineError):
    code = "model_not_loaded"


class Residency:
    def __init__(self, pipelines: dict[str, Any]):
        self._pipelines = dict(pipelines)
        self._locks = {model: threading.Lock() for model in pipelines}

    @classmethod
    def load(
        cls,
        models: list[str],
        *,
        models_dir: Path,
        device: str = "auto",
        attention: str = "auto",
        quant: Optional[str] = None,
    ) -> "Residency":
        from turbodiffusion_core.pipeline import load_pipeline  # torch: only in the worker, only here

        pipelines = {}
        for model in models:
            start = time.perf_counter()
            log.info("loading %s (device %s, attention %s, quant %s)", model, device, attention, quant or "none")
            pipelines[model] = load_pipeline(model, models_dir=models_dir, device=device, attention=attention,
                                             quant=quant)
            log.info("%s resident after %.1f s: %s", model, time.perf_counter() - start, pipelines[model].info())
        return cls(pipelines)

    @property
    def models(self) -> list[str]:
        return list(self._pipelines)

    def get(self, model: str) -> Any:
        try:
            return self._pipelines[model]
        except KeyError:
            raise NotResident(f"this worker holds {', '.join(self._pipelines)}, not {model}") from None

    def lock(self, model: str) -> threading.Lock:
        self.get(model)
        return self._locks[model]

    def describe(self) -> dict[str, dict]:
        """model -> pipeline info (device, attention, quant...), for the fleet registry."""
        return {model: pipe.info() for model, pipe in self._pipelines.items()}
