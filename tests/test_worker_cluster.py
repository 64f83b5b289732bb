"""Two worker processes on one Redis: many jobs run once each, and a worker killed with SIGKILL in
the middle of a video loses nothing (the video completes on the other worker).

Each worker sleeps TD_TEST_STEP_DELAY after every denoising step (a test-only setting) so jobs
last long enough to overlap and to be killed mid-run."""

from __future__ import annotations

import json
import os
import signal

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from server import fleet
from server.app import create_app
from tests.conftest import FAST, launch_worker, make_settings, stop_process, wait_for, wait_status

STEP_DELAY = 0.5


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory, models_dir):
    """(client, redis, {worker name: process}) with two live workers serving tiny-t2v."""
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    conn = Redis.from_url(url)
    conn.flushdb()
    tmp = tmp_path_factory.mktemp("cluster")
    settings = make_settings(url, tmp / "storage", models_dir)
    procs = {name: launch_worker(settings, name, tmp / f"{name}.log", TD_TEST_STEP_DELAY=STEP_DELAY)
             for name in ("worker-a", "worker-b")}
    try:
        wait_for(lambda: len(fleet.live_workers(conn)) == 2, 90, what="two workers to register")
        with TestClient(create_app(settings)) as client:
            yield client, conn, procs
    finally:
        for proc in procs.values():
            stop_process(proc)
        conn.close()


def record(conn: Redis, video_id: str) -> dict:
    return {k.decode(): json.loads(v) for k, v in conn.hgetall(f"td:video:{video_id}").items()}


def test_many_jobs_on_two_workers_each_run_once(cluster):
    client, conn, _ = cluster
    ids = [client.post("/v1/videos", json=dict(FAST, prompt=f"clip {i}")).json()["id"] for i in range(6)]
    videos = [wait_status(client, vid, timeout=90) for vid in ids]
    assert [v["status"] for v in videos] == ["completed"] * 6
    assert [v["attempts"] for v in videos] == [1] * 6  # claimed exactly once each
    workers = {record(conn, vid)["worker"] for vid in ids}
    assert workers == {"worker-a", "worker-b"}  # the work was shared
    assert conn.scard("td:active") == 0


def test_sigkill_mid_job_completes_on_the_other_worker(cluster):
    client, conn, procs = cluster
    video = client.post("/v1/videos", json=dict(FAST, prompt="survivor", steps=4)).json()

    def running_step():
        rec = record(conn, video["id"])
        return rec if rec["status"] == "in_progress" and (rec.get("step") or 0) >= 1 else None

    victim = wait_for(running_step, 60, what="the video to be mid-denoise")["worker"]
    os.kill(procs[victim].pid, signal.SIGKILL)
    procs[victim].wait(10)

    done = wait_status(client, video["id"], timeout=90)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    rec = record(conn, video["id"])
    assert rec["worker"] != victim and rec["attempt"] == 2
    assert client.get(f"/v1/videos/{video['id']}/content").status_code == 200
