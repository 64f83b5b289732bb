"""Which models this deployment serves right now: the ones live workers registered (server.fleet)
plus any listed in TD_MODELS (accepted even before their worker has finished loading).

POST /v1/videos consults this on every request, so the fleet read is cached for a second.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from redis import Redis

from server import fleet
from turbodiffusion_core.spec import PRESETS, SpecError, get_preset


class Catalog:
    def __init__(self, connection: Redis, configured: list[str], ttl: float = 1.0):
        for model in configured:
            get_preset(model)  # fail at start-up on a typo in TD_MODELS
        self.connection = connection
        self.configured = list(configured)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, list[dict[str, Any]]]] = (0.0, {})

    def live(self) -> dict[str, list[dict[str, Any]]]:
        """model -> live workers holding it (cached for `ttl` seconds)."""
        with self._lock:
            at, data = self._cached
            if time.monotonic() - at < self.ttl:
                return data
        data = fleet.served_models(self.connection)
        with self._lock:
            self._cached = (time.monotonic(), data)
        return data

    def models(self) -> list[str]:
        live = self.live()
        return [m for m in PRESETS if m in live or m in self.configured]

    def default_model(self) -> Optional[str]:
        """The model a request without `model` gets: the first configured one, else the only one served."""
        if self.configured:
            return self.configured[0]
        served = self.models()
        return served[0] if len(served) == 1 else None

    def check(self, model: Optional[str]) -> str:
        """The model id to use, or SpecError(model_not_found) naming what is served."""
        served = self.models()
        if model is None:
            model = self.default_model()
            if model is None:
                raise SpecError(
                    "model is required: this server serves " + (", ".join(served) or "no models yet"),
                    "model",
                    code="missing_required_parameter",
                )
        get_preset(model)  # unknown preset: SpecError(model_not_found) listing every preset
        if model not in served:
            raise SpecError(
                f"model {model!r} is not served here; served now: {', '.join(served) or 'none (no live worker)'}",
                "model",
                code="model_not_found",
            )
        return model
