"""Liveness, readiness and Prometheus metrics (no API key needed: meant for orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from redis.exceptions import RedisError

from server import fleet, metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Redis answers and at least one worker holds a model (503 otherwise)")
def readyz(request: Request):
    store = request.app.state.store
    try:
        store.r.ping()
        workers = fleet.live_workers(store.r)
    except RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": f"error: {exc}", "workers": 0}, status_code=503)
    models = sorted({m for w in workers for m in (w.get("models") or {})})
    body = {"status": "ready" if workers else "no_workers", "redis": "ok", "workers": len(workers),
            "models": models}
    return JSONResponse(body, status_code=200 if workers else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def prometheus(request: Request):
    return PlainTextResponse(metrics.render(request.app.state.store),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
