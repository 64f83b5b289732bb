"""Redis (the job store) goes away under a running API and workers and comes back: requests get OpenAI's error
envelope with 503 `store_unavailable` and Retry-After (never a bare 500 or a hung request), the health checks
say so, and everything works again once Redis is back on its port (here an empty one, started without
persistence; docker-compose runs Redis with an append-only file so records survive a restart)."""

from __future__ import annotations

import time

from server.launcher import EmbeddedRedis
from tests.conftest import FAST, make_settings


def test_store_outage_is_a_503_and_recovers(tmp_path, models_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app

    redis = EmbeddedRedis().start()
    port = redis.port
    try:
        settings = make_settings(redis.url, tmp_path / "storage", models_dir, models=["tiny-t2v"])
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            created = client.post("/v1/videos", json=dict(FAST, prompt="a lighthouse in fog"))
            assert created.status_code == 200, created.text

            redis.stop()
            started = time.monotonic()
            for method, path, body in (("get", f"/v1/videos/{created.json()['id']}", None),
                                       ("get", "/v1/videos", None),
                                       ("post", "/v1/videos", dict(FAST, prompt="a second lighthouse")),
                                       ("post", f"/v1/videos/{created.json()['id']}/cancel", None)):
                resp = client.request(method, path, json=body)
                assert resp.status_code == 503, (path, resp.status_code, resp.text)
                assert resp.json()["error"] == {"message": "the job store is unavailable; retry in a moment",
                                                "type": "server_error", "param": None, "code": "store_unavailable"}
                assert resp.headers["retry-after"] == "1" and resp.headers["x-request-id"]
            assert time.monotonic() - started < 20  # refused connections fail fast
            assert client.get("/readyz").status_code == 503

            redis = EmbeddedRedis(port=port).start()  # back on the same port, empty (no persistence here)
            # the first requests after the restart go through pooled connections that the old server closed:
            # they are retried on a fresh connection, not answered with an error
            assert client.get(f"/v1/videos/{created.json()['id']}").status_code == 404  # the empty store
            assert client.get("/v1/videos").status_code == 200
            again = client.post("/v1/videos", json=dict(FAST, prompt="a third lighthouse"))
            assert again.status_code == 200, again.text
            assert client.get(f"/v1/videos/{again.json()['id']}").json()["status"] == "queued"

            # a quick restart between two requests: every pooled connection is stale, none is answered as an error
            redis.stop()
            redis = EmbeddedRedis(port=port).start()
            assert client.get(f"/v1/videos/{again.json()['id']}").status_code == 404
            assert client.get("/v1/videos").status_code == 200
            assert client.post("/v1/videos", json=dict(FAST, prompt="after a restart")).status_code == 200
    finally:
        redis.stop()


def test_worker_keeps_serving_across_a_redis_restart(tmp_path, models_dir, tiny_residency):
    """A worker outlives a Redis restart (RQ's dequeue backs off and reconnects; its pulse keeps beating) and
    takes the next video, and re-registers itself so /v1/models lists it again."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import wait_for, wait_status
    from worker.main import EmbeddedWorker, build_runtime

    redis = EmbeddedRedis().start()
    port = redis.port
    worker = None
    try:
        settings = make_settings(redis.url, tmp_path / "storage", models_dir, models=["tiny-t2v"])
        worker = EmbeddedWorker(lambda: build_runtime(settings, ["tiny-t2v"], residency=tiny_residency)).start(60)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            first = client.post("/v1/videos", json=dict(FAST, prompt="before")).json()
            assert wait_status(client, first["id"])["status"] == "completed"
            redis.stop()
            time.sleep(3)  # the worker meets a dead Redis for a while
            assert worker.alive
            redis = EmbeddedRedis(port=port).start()
            second = client.post("/v1/videos", json=dict(FAST, prompt="after"))
            assert second.status_code == 200, second.text
            assert wait_status(client, second.json()["id"], timeout=60)["status"] == "completed"
            wait_for(lambda: client.get("/v1/models").json()["data"][0].get("workers"), 30,
                     what="the worker to register again")
    finally:
        if worker is not None:
            worker.stop(10)
        redis.stop()
