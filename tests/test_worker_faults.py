"""Failure paths of a worker and of the store's state machine: CUDA OOM, job timeout, expiry,
and recovery of jobs whose worker vanished (fencing, bounded retries)."""

from __future__ import annotations

import time

from server.store import Store
from tests.conftest import FAST, wait_for, wait_status
from turbodiffusion_core import spec

FAST_JSON = dict(FAST, prompt="a windmill")


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(client, start_worker):
    # TEST-ONLY hook: a prompt with the marker raises torch.cuda.OutOfMemoryError from the first step
    start_worker(test_oom_marker="<<OOM-TEST>>")
    doomed = client.post("/v1/videos", json=dict(FAST_JSON, prompt="big <<OOM-TEST>>", steps=2)).json()
    failed = wait_status(client, doomed["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "out_of_memory")
    assert "out of memory" in failed["error"]["message"]
    fine = client.post("/v1/videos", json=FAST_JSON).json()
    assert wait_status(client, fine["id"])["status"] == "completed"


def test_job_timeout_fails_with_code_timeout(client, start_worker):
    start_worker(job_timeout=1, test_step_delay=0.6)
    video = client.post("/v1/videos", json=dict(FAST_JSON, steps=4)).json()
    failed = wait_status(client, video["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "timeout")


def test_finished_videos_expire_with_their_files(client, start_worker, settings):
    start_worker(retention_seconds=1)
    video = client.post("/v1/videos", json=FAST_JSON).json()
    done = wait_status(client, video["id"])
    assert done["status"] == "completed" and done["expires_at"] - done["completed_at"] == 1
    folder = settings.storage_dir / video["id"]
    assert any(folder.glob("*.mp4"))
    wait_for(lambda: client.get(f"/v1/videos/{video['id']}").status_code == 404, 10, what="expiry")
    assert not folder.exists()
    assert client.get("/v1/videos").json()["data"] == []


def _queued(store: Store) -> str:
    request = spec.resolve(spec.GenerationRequest(prompt="x", **FAST))
    rec, created = store.create(video_id="video_" + "ab" * 16, owner="public", resolved=request)
    assert created
    return rec["id"]


def test_dead_workers_job_is_requeued_and_the_old_attempt_fenced(settings, redis_conn):
    store = Store(redis_conn, settings.model_copy(update={"lease_seconds": 0.2}))
    vid = _queued(store)
    assert store.claim(vid, 1, "w-dead") == "ok"
    assert store.claim(vid, 1, "w-other") == "in_progress"  # the same ticket can't be claimed twice
    time.sleep(0.3)  # w-dead stops renewing its lease
    assert store.recover_orphans() == 1
    rec = store.get(vid)
    assert (rec["status"], rec["attempt"], rec["runs"]) == ("queued", 2, 1)
    assert store.queue_position(rec) == 0  # back at the front of its queue
    # the old attempt can no longer write anything
    assert store.update(vid, 1, progress=50) is False
    assert store.finish(vid, 1, "completed") is None
    assert store.stop_reason(vid, 1) == "stale"
    assert store.renew_lease(vid, 1, "w-dead") is False
    assert store.claim(vid, 1, "w-dead") == "stale"
    assert store.claim(vid, 2, "w-new") == "ok"
    assert store.finish(vid, 2, "completed", files={}) is not None
    assert store.get(vid)["status"] == "completed"


def test_retries_are_bounded(settings, redis_conn):
    store = Store(redis_conn, settings.model_copy(update={"lease_seconds": 0.1, "max_retries": 1}))
    vid = _queued(store)
    for attempt in (1, 2):
        assert store.claim(vid, attempt, f"w{attempt}") == "ok"
        time.sleep(0.15)
        assert store.recover_orphans() == 1
    rec = store.get(vid)
    assert (rec["status"], rec["error"]["code"], rec["runs"]) == ("failed", "worker_lost", 2)
    assert not redis_conn.sismember("td:active", vid)


def test_live_lease_is_left_alone(settings, redis_conn):
    store = Store(redis_conn, settings.model_copy(update={"lease_seconds": 5}))
    vid = _queued(store)
    assert store.claim(vid, 1, "w1") == "ok"
    assert store.recover_orphans() == 0
    assert store.renew_lease(vid, 1, "w1") is True
    assert store.get(vid)["status"] == "in_progress"


def test_ticket_popped_but_never_claimed_gets_a_new_one(settings, redis_conn):
    """A worker killed between taking the RQ ticket and claiming the video leaves no trace in any
    queue; the sweep notices once the video has waited longer than a lease."""
    store = Store(redis_conn, settings.model_copy(update={"lease_seconds": 0.2}))
    vid = _queued(store)
    queue_key = store.queues.for_model("tiny-t2v", "normal").key
    assert redis_conn.lpop(queue_key).decode() == f"{vid}-a1"  # what the dying worker's BLPOP did
    assert store.recover_orphans() == 0  # too early: it may just be on its way to a worker
    time.sleep(0.3)
    assert store.recover_orphans() == 1
    rec = store.get(vid)
    assert (rec["status"], rec["attempt"], rec["runs"]) == ("queued", 2, 0)
    assert redis_conn.lrange(queue_key, 0, -1) == [f"{vid}-a2".encode()]
