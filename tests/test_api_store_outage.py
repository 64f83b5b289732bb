"""Redis (the job store) goes away under a running API and comes back: requests get OpenAI's error envelope
with 503 `store_unavailable` and Retry-After (never a bare 500 or a hung request), the health checks say so,
and everything works again, nothing lost, once Redis is back on its port."""

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
            again = client.post("/v1/videos", json=dict(FAST, prompt="a third lighthouse"))
            assert again.status_code == 200, again.text
            assert client.get(f"/v1/videos/{again.json()['id']}").json()["status"] == "queued"
    finally:
        redis.stop()
