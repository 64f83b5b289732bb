"""Which workers are alive and which models (with which quant / attention mode) they hold.

Each worker writes one small JSON document under `td:worker:<name>` with a TTL and refreshes it
from its pulse thread; a worker that dies simply expires. The API reads this for GET /v1/models,
for /readyz and to decide whether a model is served here. Imports neither FastAPI nor torch.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

WORKER_KEY = "td:worker:{name}"
WORKER_INDEX = "td:workers"


def register(connection: Redis, name: str, info: dict[str, Any], ttl: float) -> None:
    """Announce (or refresh) a live worker. `info["models"]` maps model id -> pipeline info."""
    doc = dict(info, name=name, seen_at=time.time())
    with connection.pipeline(transaction=False) as p:
        p.set(WORKER_KEY.format(name=name), json.dumps(doc), px=max(1, int(ttl * 1000)))
        p.sadd(WORKER_INDEX, name)
        p.execute()


def unregister(connection: Redis, name: str) -> None:
    with connection.pipeline(transaction=False) as p:
        p.delete(WORKER_KEY.format(name=name))
        p.srem(WORKER_INDEX, name)
        p.execute()


def live_workers(connection: Redis) -> list[dict[str, Any]]:
    """Documents of the workers whose key has not expired; expired names are pruned from the index."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in connection.smembers(WORKER_INDEX))
    if not names:
        return []
    docs = connection.mget([WORKER_KEY.format(name=n) for n in names])
    alive, dead = [], []
    for name, raw in zip(names, docs):
        if raw is None:
            dead.append(name)
        else:
            alive.append(json.loads(raw))
    if dead:
        connection.srem(WORKER_INDEX, *dead)
    return alive


def served_models(connection: Redis) -> dict[str, list[dict[str, Any]]]:
    """model id -> [{"worker": name, **pipeline info}, ...] over live workers."""
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in live_workers(connection):
        for model, info in (doc.get("models") or {}).items():
            out.setdefault(model, []).append(dict(info, worker=doc["name"]))
    return out
