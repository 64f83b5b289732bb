"""Signed webhooks for video events, delivered from their own RQ queue with retries.

Signing follows Standard Webhooks, which is also what OpenAI uses (reference/serving.md §1.7), so
`openai.OpenAI(webhook_secret=...).webhooks.verify_signature()` and the `standardwebhooks`
libraries accept our deliveries: HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"`,
sent as `webhook-signature: v1,<base64>`, keyed by the base64 part of a `whsec_...` secret.

Delivery never runs on a GPU worker: `enqueue_event` only puts a job on `WEBHOOK_QUEUE`, and a
webhook worker (worker/webhook_worker.py) runs `deliver`. A failed attempt schedules the next one
with `Queue.enqueue_at`, so the webhook worker must run with a scheduler (ours runs one in-process).
Every attempt, and every URL refused by the guard, is appended to `td:webhook-log:{video_id}`,
which the API shows on the video.

The same event keeps one `webhook-id` and a byte-identical body across retries (receivers use the
id to de-duplicate: delivery is at least once); each attempt gets a fresh timestamp and signature.

Nothing is lost when a webhook worker dies mid-attempt (SIGKILL, OOM, a lost machine): each attempt
holds a lease in `INFLIGHT` (a sorted set of job id -> deadline) while it runs, and every webhook worker
sweeps that set (`requeue_abandoned`); an attempt whose deadline passed is logged as "interrupted" and
queued again as a fresh job, with the same webhook-id and body. RQ itself would notice the dead job only
after a minute or more and then just mark it failed.

Imports neither torch nor FastAPI: GPU workers import this module to enqueue events.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple, Optional, TypedDict
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from server.netguard import HostResolutionError, UnsafeURLError, check_public_url, open_checked

log = logging.getLogger("turbodiffusion.webhooks")

WEBHOOK_QUEUE = "td-webhooks"
"""The RQ queue delivery jobs go to; a webhook worker (with its scheduler) must listen on it."""

EVENT_TYPES = ("video.completed", "video.failed", "video.cancelled", "video.in_progress")
"""OpenAI's two video events, plus our extras (sent only when a request asks for them)."""
DEFAULT_EVENT_TYPES = ("video.completed", "video.failed")
"""What a video gets when it names no `webhook_events` (callers filter; see server/notify.py)."""

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
"""Seconds to wait before attempt 2, 3, ...: one first try plus ten retries over about two days."""
DEFAULT_TIMEOUT_S = 10.0
JITTER = 0.2
"""Each wait is scaled by a random factor in [1 - JITTER, 1 + JITTER], so retries do not arrive in
lockstep after an outage of the receiver."""
MAX_RETRY_AFTER_S = 24 * 3600.0
"""A receiver's Retry-After is honoured up to this many seconds."""

INFLIGHT = "td:webhooks:inflight"
"""Sorted set: RQ job id of each attempt in progress -> unix time after which it counts as abandoned."""
LEASE_GRACE_S = 5.0
"""An attempt's lease is twice its HTTP timeout plus this: far past any attempt whose worker is alive."""

LOG_KEY = "td:webhook-log:{video_id}"
LOG_TTL_S = 7 * 24 * 3600
LOG_MAX_ENTRIES = 100
USER_AGENT = "TurboDiffusion-Webhooks/1.0"


# ------------------------------------------------------------------------------------------------
# Signing
# ------------------------------------------------------------------------------------------------
def generate_secret() -> str:
    """A new signing secret: `whsec_` + base64 of 32 random bytes (Standard Webhooks asks 24-64)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    """The HMAC key: the decoded base64 part of a `whsec_` secret, else the secret's UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{msg_id}.{timestamp}.".encode("utf-8") + body
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(secret: Optional[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """All headers of one delivery. Without a secret the delivery goes out unsigned."""
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        headers["webhook-signature"] = sign(secret, msg_id, timestamp, body)
    return headers


# ------------------------------------------------------------------------------------------------
# Events
# ------------------------------------------------------------------------------------------------
class DeliveryTask(TypedDict):
    """Everything one delivery attempt needs; the argument of the RQ job that runs `deliver`.

    `body` is the event serialized once, so every retry sends the same bytes under the same
    `webhook_id`. `schedule` holds the waits before each retry (its length + 1 attempts in all).
    """

    video_id: str
    event_id: str
    event_type: str
    webhook_id: str
    url: str
    body: str
    secret: Optional[str]
    allow_private: bool
    attempt: int
    schedule: tuple[float, ...]
    timeout: float


def build_event(event_type: str, video: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-shaped event: a thin payload naming the video, plus a few fields that save the
    receiver a round trip (status, model, progress, and the error of a failed video)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}; known: {', '.join(EVENT_TYPES)}")
    data: dict[str, Any] = {
        "id": video["id"],
        "object": video.get("object", "video"),
        "status": video.get("status"),
        "model": video.get("model"),
        "progress": video.get("progress"),
    }
    if video.get("error"):
        data["error"] = video["error"]
    return {
        "id": "evt_" + uuid.uuid4().hex,
        "object": "event",
        "created_at": int(time.time()),
        "type": event_type,
        "data": data,
    }


def enqueue_event(
    redis_conn: Redis,
    *,
    video: dict[str, Any],
    event_type: str,
    url: Optional[str],
    secret: Optional[str],
    allow_private: bool,
    schedule: Sequence[float] = DEFAULT_RETRY_SCHEDULE,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Queue the delivery of one event for `video` to `url`; a no-op when there is no URL.

    A URL the guard refuses is recorded in the delivery log and never sent. A host that does not
    resolve right now is queued anyway: delivery re-checks it and retries, as DNS may recover.
    `schedule` holds the waits before each retry (its length + 1 attempts in all).
    """
    if not url:
        return
    event = build_event(event_type, video)
    task: DeliveryTask = {
        "video_id": video["id"],
        "event_id": event["id"],
        "event_type": event_type,
        "webhook_id": "wh_" + uuid.uuid4().hex,
        "url": url,
        "body": json.dumps(event, separators=(",", ":")),
        "secret": secret,
        "allow_private": allow_private,
        "attempt": 1,
        "schedule": tuple(float(s) for s in schedule),
        "timeout": float(timeout),
    }
    try:
        check_public_url(url, allow_private)
    except UnsafeURLError as exc:
        _record(redis_conn, task, outcome="refused", error=str(exc))
        log.warning("webhook %s for %s refused: %s", event_type, task["video_id"], exc)
        return
    except HostResolutionError:
        pass
    _enqueue(Queue(WEBHOOK_QUEUE, connection=redis_conn), task, run_at=None)


def _enqueue(queue: Queue, task: DeliveryTask, run_at: Optional[int], job_id: Optional[str] = None) -> None:
    """Put attempt `task["attempt"]` on `queue`, now or at unix time `run_at` (whole seconds:
    RQ's scheduled-job registry keeps no finer times).

    The description names the event and the host only: it shows up in rq-dashboard, and the job's
    arguments carry the signing secret.
    """
    options: dict[str, Any] = {
        "args": (task,),
        "job_id": job_id or f"{task['webhook_id']}-{task['attempt']}",
        "description": f"webhook {task['event_type']} {task['video_id']} -> {urlsplit(task['url']).hostname}",
        "job_timeout": int(task["timeout"]) + 30,
        "result_ttl": 3600,
        "failure_ttl": LOG_TTL_S,
    }
    if run_at is None:
        queue.enqueue(deliver, **options)
    else:
        queue.enqueue_at(datetime.fromtimestamp(run_at, tz=timezone.utc), deliver, **options)


# ------------------------------------------------------------------------------------------------
# Delivery (runs on the webhook worker)
# ------------------------------------------------------------------------------------------------
def deliver(task: DeliveryTask) -> dict[str, Any]:
    """One delivery attempt, run as an RQ job: POST, log the outcome, schedule a retry if due.

    2xx ends it (delivered); 410 Gone ends it (the receiver asked us to stop); a URL the guard now
    refuses ends it (refused); anything else (other statuses, 3xx included, network errors, a host
    that no longer resolves) retries after the next wait in the schedule, or at the receiver's
    Retry-After if that is later, until the schedule is used up (failed). Returns the log entry.
    """
    job = get_current_job()
    if job is None:
        raise RuntimeError("deliver() runs as an RQ job on the webhook queue; use enqueue_event()")
    job.connection.zadd(INFLIGHT, {job.id: time.time() + lease_seconds(task)})
    result = _attempt(task)
    # Still ours unless a sweep judged this attempt abandoned and queued it again: then that copy
    # carries the delivery on, and this one only records what it saw.
    owned = bool(job.connection.zrem(INFLIGHT, job.id))
    attempt, schedule = task["attempt"], task["schedule"]
    if result.status_code is not None and 200 <= result.status_code < 300:
        outcome = "delivered"
    elif result.status_code == 410:
        outcome = "gone"
    elif result.refused:
        outcome = "refused"
    elif attempt > len(schedule):
        outcome = "failed"
    else:
        outcome = "retrying"
    next_retry_at = None
    if outcome == "retrying":
        # Rounded up to the second, so a retry never comes before the receiver's Retry-After.
        next_retry_at = math.ceil(time.time() + retry_delay(schedule, attempt, result.retry_after))
    entry = _record(
        job.connection,
        task,
        outcome=outcome,
        status_code=result.status_code,
        error=result.error,
        next_retry_at=next_retry_at,
    )
    log.info(
        "webhook %s for %s -> %s: attempt %d %s (%s)",
        task["event_type"], task["video_id"], urlsplit(task["url"]).hostname, attempt, outcome,
        result.status_code if result.status_code is not None else result.error,
    )
    if next_retry_at is not None and owned:
        queue = Queue(job.origin, connection=job.connection, serializer=job.serializer)
        _enqueue(queue, {**task, "attempt": attempt + 1}, run_at=next_retry_at)
    return entry


def lease_seconds(task: DeliveryTask) -> float:
    return 2 * float(task["timeout"]) + LEASE_GRACE_S


def requeue_abandoned(redis_conn: Redis, now: Optional[float] = None) -> list[str]:
    """Queue again every attempt whose lease ran out (its worker died mid-attempt); returns their job ids.

    Safe to run from several workers at once: ZREM decides which sweeper takes each attempt. The copy
    is a new RQ job (id suffixed `-r<n>`) with the same task, so the receiver sees the same webhook-id;
    the dead job is left to RQ, which moves it to its failed registry when it notices.
    """
    now = time.time() if now is None else now
    requeued = []
    for raw in redis_conn.zrangebyscore(INFLIGHT, 0, now):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not redis_conn.zrem(INFLIGHT, job_id):
            continue  # another sweeper took it, or the attempt finished just now
        try:
            job = Job.fetch(job_id, connection=redis_conn)
        except NoSuchJobError:
            log.warning("abandoned webhook attempt %s has no RQ job left; cannot re-queue it", job_id)
            continue
        task: DeliveryTask = job.args[0]
        base, _, count = job_id.partition("-r")
        copy_id = f"{base}-r{int(count) + 1 if count.isdigit() else 1}"
        _record(redis_conn, task, outcome="interrupted",
                error="the webhook worker stopped during this attempt; queued again")
        _enqueue(Queue(job.origin, connection=redis_conn, serializer=job.serializer), task, run_at=None,
                 job_id=copy_id)
        log.warning("webhook %s for %s: attempt %d was abandoned by a dead worker; queued again as %s",
                    task["event_type"], task["video_id"], task["attempt"], copy_id)
        requeued.append(job_id)
    return requeued


def next_lease_deadline(redis_conn: Redis) -> Optional[float]:
    """The earliest deadline of an attempt in progress, or None when none is."""
    return earliest_score(redis_conn, INFLIGHT)


def earliest_score(redis_conn: Redis, key: str) -> Optional[float]:
    """The lowest score in the sorted set `key` (a time, here), or None when it is empty."""
    first = redis_conn.zrange(key, 0, 0, withscores=True)
    return float(first[0][1]) if first else None


class AttemptResult(NamedTuple):
    status_code: Optional[int]
    error: Optional[str]
    retry_after: Optional[float] = None
    refused: bool = False


def _attempt(task: DeliveryTask) -> AttemptResult:
    """POST once. The URL is checked again first, since what its host resolves to may have
    changed since the event was queued."""
    body = task["body"].encode("utf-8")
    headers = signed_headers(task["secret"], task["webhook_id"], int(time.time()), body)
    try:
        with open_checked("POST", task["url"], allow_private=task["allow_private"], timeout=task["timeout"],
                          headers=headers, content=body) as response:
            return AttemptResult(response.status_code, None, parse_retry_after(response.headers.get("retry-after")))
    except UnsafeURLError as exc:
        return AttemptResult(None, str(exc), refused=True)
    except HostResolutionError as exc:
        return AttemptResult(None, str(exc))
    except httpx.HTTPError as exc:
        return AttemptResult(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def retry_delay(schedule: Sequence[float], attempt: int, retry_after: Optional[float] = None) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): the schedule's entry with jitter,
    or the receiver's Retry-After (capped at MAX_RETRY_AFTER_S) when that is longer."""
    delay = schedule[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------------------
# Delivery log
# ------------------------------------------------------------------------------------------------
def _record(
    redis_conn: Redis,
    task: DeliveryTask,
    *,
    outcome: str,
    status_code: Optional[int] = None,
    error: Optional[str] = None,
    next_retry_at: Optional[int] = None,
) -> dict[str, Any]:
    """Append one attempt to the video's delivery log (bounded length, refreshed TTL)."""
    entry = {
        "event_id": task["event_id"],
        "webhook_id": task["webhook_id"],
        "type": task["event_type"],
        "attempt": task["attempt"],
        "url": _display_url(task["url"]),
        "outcome": outcome,
        "status_code": status_code,
        "error": error,
        "at": int(time.time()),
        "next_retry_at": next_retry_at,
    }
    key = LOG_KEY.format(video_id=task["video_id"])
    with redis_conn.pipeline() as pipe:
        pipe.rpush(key, json.dumps(entry))
        pipe.ltrim(key, -LOG_MAX_ENTRIES, -1)
        pipe.expire(key, LOG_TTL_S)
        pipe.execute()
    return entry


def _display_url(url: str) -> str:
    """The URL without credentials or query string, which may hold tokens, for showing in logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(malformed URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def delivery_log(redis_conn: Redis, video_id: str) -> list[dict[str, Any]]:
    """Every recorded attempt for the video, oldest first (entries as written by `_record`)."""
    return [json.loads(raw) for raw in redis_conn.lrange(LOG_KEY.format(video_id=video_id), 0, -1)]
