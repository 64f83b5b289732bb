"""Webhooks: Standard Webhooks signatures (checked with the `openai` SDK's own verifier) and real
deliveries through a real RQ webhook worker and Redis to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import openai
import pytest
from redis import Redis
from rq import Queue
from rq.registry import ScheduledJobRegistry

from server.webhooks import (
    MAX_RETRY_AFTER_S,
    WEBHOOK_QUEUE,
    build_event,
    delivery_log,
    enqueue_event,
    generate_secret,
    parse_retry_after,
    requeue_abandoned,
    retry_delay,
    sign,
    signed_headers,
)
from worker.webhook_worker import register_cli, run_webhook_worker

REDIS_DB = 13  # this file's own database: the webhook queue name is fixed, so tests isolate by DB
FAST_SCHEDULE = (0.1, 0.1, 0.1)
VIDEO = {"id": "video_0123abcd", "object": "video", "status": "completed", "model": "tiny-t2v", "progress": 100}


@pytest.fixture
def redis_conn() -> Iterator[Redis]:
    conn = Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    conn.flushdb()
    yield conn
    conn.flushdb()


class Receiver:
    """An HTTP endpoint that answers POSTs with scripted statuses (the last one repeats) and keeps
    every request it got."""

    def __init__(self, statuses: list[int], headers: Optional[dict[str, str]] = None,
                 hold_first: Optional[threading.Event] = None) -> None:
        self.statuses = list(statuses)
        self.extra_headers = headers or {}
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                if hold_first is not None and len(receiver.requests) == 1:
                    hold_first.wait(30)  # the first request hangs until the test lets it go
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                for name, value in receiver.extra_headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _enqueue(conn: Redis, receiver: Receiver, secret: Optional[str], **kwargs) -> None:
    enqueue_event(conn, video=VIDEO, event_type="video.completed", url=receiver.url, secret=secret,
                  allow_private=kwargs.pop("allow_private", True), **{"schedule": FAST_SCHEDULE, **kwargs})


def _nothing_left(conn: Redis) -> bool:
    queue = Queue(WEBHOOK_QUEUE, connection=conn)
    return queue.count == 0 and ScheduledJobRegistry(queue=queue).count == 0


# ------------------------------------------------------------------------------------------------
# Signing
# ------------------------------------------------------------------------------------------------
def test_sign_reproduces_the_standard_webhooks_test_vector() -> None:
    # The published example of the Standard Webhooks spec (secret, id, timestamp, payload -> signature).
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                     b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_openai_sdk_accepts_our_signature_and_rejects_a_tampered_body() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(secret) > 40
    body = json.dumps(build_event("video.completed", VIDEO)).encode()
    headers = signed_headers(secret, "wh_123", int(time.time()), body)
    client = openai.OpenAI(api_key="x", webhook_secret=secret)

    client.webhooks.verify_signature(body, headers)
    event = client.webhooks.unwrap(body, headers)
    assert event.type == "video.completed" and event.data.id == VIDEO["id"]

    tampered = body.replace(b"completed", b"failed")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(tampered, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body, headers, secret=generate_secret())


def test_raw_secret_without_prefix_is_used_as_utf8_bytes() -> None:
    body = b'{"id":"evt_1"}'
    headers = signed_headers("plain-secret", "wh_1", int(time.time()), body)
    openai.OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret="plain-secret")
    assert "webhook-signature" not in signed_headers(None, "wh_1", 0, body)


def test_build_event_is_openai_shaped_and_carries_the_error_of_a_failed_video() -> None:
    failed = {**VIDEO, "status": "failed", "error": {"code": "out_of_memory", "message": "CUDA OOM"}}
    event = build_event("video.failed", failed)
    assert event["object"] == "event" and event["id"].startswith("evt_")
    assert event["type"] == "video.failed" and isinstance(event["created_at"], int)
    assert event["data"]["id"] == VIDEO["id"] and event["data"]["error"]["code"] == "out_of_memory"
    assert "error" not in build_event("video.completed", VIDEO)["data"]
    with pytest.raises(ValueError, match="video.completed"):
        build_event("video.exploded", VIDEO)


def test_retry_delay_has_bounded_jitter_and_honours_retry_after() -> None:
    delays = [retry_delay((10.0, 60.0), 1) for _ in range(200)]
    assert all(8.0 <= d <= 12.0 for d in delays) and len(set(delays)) > 1
    assert 48.0 <= retry_delay((10.0, 60.0), 2) <= 72.0
    assert retry_delay((10.0,), 1, retry_after=300.0) == 300.0
    assert retry_delay((10.0,), 1, retry_after=10 * MAX_RETRY_AFTER_S) == MAX_RETRY_AFTER_S
    assert parse_retry_after("120") == 120.0
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55.0 <= parse_retry_after(in_a_minute) <= 61.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# ------------------------------------------------------------------------------------------------
# Delivery through a real webhook worker
# ------------------------------------------------------------------------------------------------
def test_failed_deliveries_are_retried_with_the_same_webhook_id_until_accepted(redis_conn: Redis) -> None:
    secret = generate_secret()
    with Receiver([500, 500, 200]) as receiver:
        _enqueue(redis_conn, receiver, secret)
        assert run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")

    assert len(receiver.requests) == 3
    ids = {headers["webhook-id"] for headers, _, _ in receiver.requests}
    assert len(ids) == 1 and ids.pop().startswith("wh_")
    assert len({body for _, body, _ in receiver.requests}) == 1
    verifier = openai.OpenAI(api_key="x", webhook_secret=secret).webhooks
    for headers, body, _ in receiver.requests:
        verifier.verify_signature(body, headers)
        assert headers["content-type"] == "application/json" and headers["user-agent"]
    assert json.loads(receiver.requests[0][1])["data"]["id"] == VIDEO["id"]

    entries = delivery_log(redis_conn, VIDEO["id"])
    assert [e["attempt"] for e in entries] == [1, 2, 3]
    assert [e["status_code"] for e in entries] == [500, 500, 200]
    assert [e["outcome"] for e in entries] == ["retrying", "retrying", "delivered"]
    assert all(e["next_retry_at"] is not None for e in entries[:2]) and entries[2]["next_retry_at"] is None
    assert entries[0]["url"].endswith("/hooks") and "token" not in entries[0]["url"]
    assert _nothing_left(redis_conn)


def test_loopback_url_is_refused_and_logged_without_sending(redis_conn: Redis) -> None:
    with Receiver([200]) as receiver:
        _enqueue(redis_conn, receiver, generate_secret(), allow_private=False)
        assert Queue(WEBHOOK_QUEUE, connection=redis_conn).count == 0
        run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
    assert receiver.requests == []
    (entry,) = delivery_log(redis_conn, VIDEO["id"])
    assert entry["outcome"] == "refused" and "loopback" in entry["error"] and entry["status_code"] is None


def test_malformed_url_is_refused_and_logged(redis_conn: Redis) -> None:
    enqueue_event(redis_conn, video=VIDEO, event_type="video.failed", url="http://[::1", secret=None,
                  allow_private=True)
    (entry,) = delivery_log(redis_conn, VIDEO["id"])
    assert entry["outcome"] == "refused" and "malformed" in entry["error"] and entry["type"] == "video.failed"
    assert Queue(WEBHOOK_QUEUE, connection=redis_conn).count == 0


def test_gone_stops_retries(redis_conn: Redis) -> None:
    with Receiver([410]) as receiver:
        _enqueue(redis_conn, receiver, generate_secret())
        run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
    assert len(receiver.requests) == 1
    assert [e["outcome"] for e in delivery_log(redis_conn, VIDEO["id"])] == ["gone"]
    assert _nothing_left(redis_conn)


def test_gives_up_when_the_schedule_is_used_up(redis_conn: Redis) -> None:
    with Receiver([503]) as receiver:
        _enqueue(redis_conn, receiver, None, schedule=(0.1,))
        run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
    assert len(receiver.requests) == 2
    assert "webhook-signature" not in receiver.requests[0][0]
    assert [e["outcome"] for e in delivery_log(redis_conn, VIDEO["id"])] == ["retrying", "failed"]


def test_retry_after_from_the_receiver_delays_the_retry(redis_conn: Redis) -> None:
    with Receiver([429, 200], headers={"Retry-After": "2"}) as receiver:
        _enqueue(redis_conn, receiver, generate_secret(), schedule=(0.01,))
        run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
    first, second = delivery_log(redis_conn, VIDEO["id"])
    assert first["status_code"] == 429 and first["next_retry_at"] >= first["at"] + 2
    assert second["outcome"] == "delivered"
    assert receiver.requests[1][2] - receiver.requests[0][2] >= 1.0


def test_no_url_is_a_no_op(redis_conn: Redis) -> None:
    enqueue_event(redis_conn, video=VIDEO, event_type="video.completed", url=None, secret=None, allow_private=False)
    assert Queue(WEBHOOK_QUEUE, connection=redis_conn).count == 0 and delivery_log(redis_conn, VIDEO["id"]) == []


def test_worker_runs_in_a_thread_and_stops_on_its_event(redis_conn: Redis) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=run_webhook_worker, args=(redis_conn,),
                              kwargs={"stop_event": stop, "logging_level": "WARNING"})
    with Receiver([200]) as receiver:
        thread.start()
        _enqueue(redis_conn, receiver, generate_secret())
        deadline = time.time() + 15
        while not receiver.requests and time.time() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=10)
    assert len(receiver.requests) == 1
    assert not thread.is_alive()


def test_cli_subcommand_delivers_in_burst_mode(redis_conn: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="turbodiffusion")
    register_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["webhook-worker", "--help"])
    assert exited.value.code == 0 and "--burst" in capsys.readouterr().out

    with Receiver([200]) as receiver:
        _enqueue(redis_conn, receiver, generate_secret())
        args = parser.parse_args(["webhook-worker", "--burst", "--log-level", "WARNING",
                                  "--redis-url", f"redis://127.0.0.1:6379/{REDIS_DB}"])
        assert args.func(args) == 0
    assert len(receiver.requests) == 1
    assert delivery_log(redis_conn, VIDEO["id"])[0]["outcome"] == "delivered"


def test_attempt_in_flight_when_its_worker_is_killed_is_delivered_by_another(redis_conn: Redis) -> None:
    """SIGKILL a webhook worker process while its POST is in flight: the attempt's lease runs out, another
    worker queues it again, and the receiver gets the event (same webhook-id); the log says what happened."""
    release = threading.Event()
    with Receiver([200], hold_first=release) as receiver:
        _enqueue(redis_conn, receiver, generate_secret(), timeout=1.0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "turbodiffusion", "webhook-worker", "--log-level", "WARNING",
             "--redis-url", f"redis://127.0.0.1:6379/{REDIS_DB}"],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while not receiver.requests and time.time() < deadline and proc.poll() is None:
                time.sleep(0.005)
            assert receiver.requests, "the webhook worker never sent the first attempt"
            proc.kill()  # mid-attempt: the receiver is still holding the request
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            release.set()
        killed_at = time.time()
        assert run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
        assert time.time() - killed_at < 20
    assert len(receiver.requests) == 2
    first, second = (headers for headers, _, _ in receiver.requests)
    assert first["webhook-id"] == second["webhook-id"]
    assert receiver.requests[0][1] == receiver.requests[1][1]
    outcomes = [(e["attempt"], e["outcome"]) for e in delivery_log(redis_conn, VIDEO["id"])]
    assert outcomes == [(1, "interrupted"), (1, "delivered")], outcomes
    assert _nothing_left(redis_conn) and redis_conn.zcard("td:webhooks:inflight") == 0


def test_a_slow_attempt_whose_worker_lives_is_not_duplicated(redis_conn: Redis) -> None:
    """Another worker's sweep, running all along, leaves an attempt alone while its lease runs: a receiver
    that answers slowly (but within the timeout) gets exactly one request."""
    release, done = threading.Event(), threading.Event()
    swept: list[str] = []

    def sweep_all_along() -> None:
        while not done.is_set():
            swept.extend(requeue_abandoned(redis_conn))
            time.sleep(0.05)

    sweeper = threading.Thread(target=sweep_all_along)
    with Receiver([200], hold_first=release) as receiver:
        _enqueue(redis_conn, receiver, generate_secret(), timeout=5.0)
        threading.Timer(1.5, release.set).start()  # answers after 1.5 s, well inside the 5 s timeout
        sweeper.start()
        try:
            assert run_webhook_worker(redis_conn, burst=True, logging_level="WARNING")
        finally:
            done.set()
            sweeper.join()
    assert swept == [] and len(receiver.requests) == 1
    assert [e["outcome"] for e in delivery_log(redis_conn, VIDEO["id"])] == ["delivered"]


def test_webhook_modules_import_neither_torch_nor_fastapi() -> None:
    # GPU workers enqueue events and the API process runs the guard: both must stay import-light.
    code = ("import sys, server.webhooks, server.netguard, worker.webhook_worker; "
            "print(sorted(m for m in ('torch', 'fastapi') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
