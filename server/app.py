"""The FastAPI application factory: `uvicorn server.app:create_app --factory`.

The API process never imports torch: it validates requests with turbodiffusion_core.spec, writes
records and RQ jobs to Redis (server.store) and serves files the workers wrote to storage.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server import errors
from server.auth import KeyRing
from server.catalog import Catalog
from server.middleware import RequestIdMiddleware
from server.reads import VideoReads
from server.redis_client import connect, connect_async
from server.routes import health, models, ui, videos
from server.schemas import VideoCreateParams, VideoExtendParams
from server.settings import Settings
from server.store import Store

log = logging.getLogger("turbodiffusion.server")

DESCRIPTION = """OpenAI-compatible video generation (Wan2.1 / Wan2.2 with TurboDiffusion).

Point the `openai` SDK at `http://HOST:PORT/v1`. Extensions to OpenAI's Videos API are documented
on each field; a cancelled video reads `status: "failed"`, `error.code: "cancelled"`, `cancelled: true`.
"""


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    url = settings.require_redis_url()
    # Retried on fresh connections, with bounded waits: a Redis that is gone answers 503 (server.errors).
    connection = connect(url, api=True, health_check_interval=30)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyRing(settings.api_keys)
    if keys.open:
        log.warning("no TD_API_KEYS set: the API is open to anyone who can reach it")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.aredis = connect_async(url)
        app.state.reads = VideoReads(app.state.aredis)
        log.info("API ready (redis %s, storage %s)", _redact(url), settings.storage_dir)
        try:
            yield
        finally:
            await app.state.aredis.aclose()

    app = FastAPI(title="TurboDiffusion server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = Store(connection, settings)
    app.state.catalog = Catalog(connection, settings.models)
    app.state.keys = keys
    app.add_middleware(RequestIdMiddleware)
    errors.install(app)
    app.include_router(videos.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(ui.router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The generated schema, plus the create and extend bodies (read by hand from JSON or multipart, so
    FastAPI cannot see them) registered under components so both content types can reference them."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (VideoCreateParams, VideoExtendParams):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    app.openapi_schema = schema
    return schema


def _redact(url: str) -> str:
    """Hide a password in a redis:// URL before logging it."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
