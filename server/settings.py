"""Configuration of the API server and the workers, read from `TD_*` environment variables.

One `Settings` object is shared by the API process, the GPU workers and the `serve` launcher so
that they agree on the Redis URL, the storage folder and the job policy (timeouts, retries,
retention). It imports neither FastAPI nor torch: workers read it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    """`TD_API_KEYS=a,b` and `TD_MODELS=m1,m2` are comma-separated lists (JSON lists work too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob, with its environment variable `TD_<NAME>` (see `turbodiffusion serve --help`)."""

    model_config = SettingsConfigDict(env_prefix="TD_", extra="ignore")

    # --- connections and folders ---------------------------------------------------------------
    redis_url: Optional[str] = Field(
        None, description="Redis URL; unset, `turbodiffusion serve` starts its own redis-server"
    )
    storage_dir: Path = Field(Path("outputs"), description="where videos, thumbnails and uploads are stored")
    models_dir: Path = Field(Path("models"), description="where model weights live")

    # --- access --------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated Bearer keys; empty means open access"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="models this deployment accepts before any worker has registered (live workers add theirs)",
    )

    # --- webhooks ------------------------------------------------------------------------------
    webhook_secret: Optional[str] = Field(None, description="whsec_... secret that signs webhooks")
    webhook_url: Optional[str] = Field(None, description="default webhook target for every video")
    allow_private_webhooks: bool = Field(False, description="allow webhook and image URLs on private networks")

    # --- limits and policy ---------------------------------------------------------------------
    max_queue: int = Field(100, ge=1, description="queued videos per model before POST answers 429")
    retention_seconds: int = Field(86_400, ge=1, description="how long finished videos and files are kept")
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="largest input_reference image accepted")
    job_timeout: int = Field(1_800, ge=1, description="seconds one generation may run before it is failed")
    max_retries: int = Field(2, ge=0, description="times a job whose worker died is started again")
    poll_after_ms: int = Field(1_000, ge=0, description="openai-poll-after-ms sent with unfinished videos")
    idempotency_ttl: int = Field(86_400, ge=1, description="seconds an Idempotency-Key is remembered")

    # --- liveness (small values make tests fast; defaults suit production) ----------------------
    lease_seconds: float = Field(30.0, gt=0, description="a running job whose worker is silent this long is retried")
    sweep_interval: float = Field(5.0, gt=0, description="seconds between a worker's recovery/expiry sweeps")
    progress_interval: float = Field(0.25, ge=0, description="least seconds between two progress writes")

    # --- test-only fault injection (never set these in production) ------------------------------
    test_step_delay: float = Field(0.0, ge=0, description="TEST ONLY: sleep this long after each denoising step")
    test_oom_marker: Optional[str] = Field(
        None, description="TEST ONLY: a prompt containing this text raises CUDA OutOfMemoryError mid-denoise"
    )

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("api_keys", "models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def open_access(self) -> bool:
        return not self.api_keys

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("TD_REDIS_URL is not set (turbodiffusion serve starts an embedded Redis)")
        return self.redis_url
