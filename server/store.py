"""Video records in Redis and the job state machine. Imports neither FastAPI nor torch.

The record (a hash `td:video:<id>`, every value JSON-encoded) is the source of truth for a video;
the RQ job is only the ticket that wakes a worker. States (turbodiffusion_core.spec.JobStatus):

    queued --claim--> in_progress --finish--> completed | failed | cancelled
      |                   |  \\--sweep (worker silent past its lease)--> queued (attempt + 1)
      \\--cancel---------> cancelled          (or failed "worker_lost" when retries are spent)

Three rules keep a video from running twice or being lost:
- Fencing: every write a worker makes names its `attempt`; a Lua script applies it only while the
  record is in_progress under that attempt. A worker that lost its lease (or whose video was
  cancelled or deleted) gets "no" and stops; a deleted record is never recreated.
- Leases: a claimed job holds `td:lease:<id>` (TTL lease_seconds) that the worker's pulse thread
  renews. A job in_progress without a lease belongs to a dead worker; the sweep re-enqueues it
  with a new attempt number (so the old RQ job and the old worker are fenced out) at the front of
  its queue, at most max_retries times.
- Atomic hand-over: the record and its RQ job are written in one MULTI/EXEC (create, requeue).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from redis import Redis
from redis.exceptions import WatchError
from rq.job import Job

from server import notify
from server.queues import Queues, rq_job_id
from server.settings import Settings
from server.webhooks import LOG_KEY as WEBHOOK_LOG
from turbodiffusion_core.spec import STAGES, TERMINAL_STATUSES, ResolvedRequest

log = logging.getLogger("turbodiffusion.server")

REC = "td:video:{id}"
LEASE = "td:lease:{id}"
OWNER_INDEX = "td:owner:{owner}"
ACTIVE = "td:active"  # ids of queued and in_progress videos (what the sweep looks at)
EXPIRY = "td:expiry"  # zset: finished video id -> expires_at
IDEMPOTENCY = "td:idem:{owner}:{key}"
METRICS = "td:metrics"  # hash of counters for /metrics

# Lua scripts. Values in the hash are JSON, so scripts decode them with cjson.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1]) then return 'stale' end
local status = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
if status ~= 'queued' then return status end
local runs = tonumber(redis.call('HGET', KEYS[1], 'runs') or '0') + 1
redis.call('HSET', KEYS[1], 'status', '"in_progress"', 'stage', '"loading"', 'progress', '0',
           'worker', ARGV[5], 'started_at', ARGV[4], 'runs', tostring(runs))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 'ok'
"""

_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1]) then return 0 end
if cjson.decode(redis.call('HGET', KEYS[1], 'status')) ~= 'in_progress' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1]) then return 0 end
if cjson.decode(redis.call('HGET', KEYS[1], 'status')) ~= 'in_progress' then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Cancel: a queued video is cancelled at once (and its ticket pulled from the queue); a running one
# gets `cancel_requested`, which its worker sees between two steps.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
local status = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'stage', 'null', 'completed_at', ARGV[3],
             'expires_at', ARGV[4], 'cancel_requested', 'true')
  redis.call('LREM', KEYS[4], 1, ARGV[2])
  redis.call('DEL', KEYS[5])  -- the RQ job hash: a job pulled from its queue would otherwise live forever
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  return 'cancelled_now'
end
if status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  return 'requested'
end
return status
"""


# Feedback (rating, note): written only while the record exists, so it never recreates a deleted video.
_FEEDBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class StoreError(Exception):
    """A request the store refuses; `code` becomes the API error code."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Idempotency:
    """An `Idempotency-Key` and a hash of the request it came with."""

    key: str
    body_hash: str


def new_video_id() -> str:
    return "video_" + secrets.token_hex(16)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def decode_record(raw: dict) -> dict[str, Any]:
    return {
        (k.decode() if isinstance(k, bytes) else k): json.loads(v)
        for k, v in raw.items()
    }


class Store:
    """All reads and transitions of video records. One per process; thread-safe (redis-py pools)."""

    def __init__(self, connection: Redis, settings: Settings):
        self.r = connection
        self.settings = settings
        self.queues = Queues(connection, settings.job_timeout)
        self._claim = connection.register_script(_CLAIM)
        self._update = connection.register_script(_UPDATE)
        self._finish = connection.register_script(_FINISH)
        self._renew = connection.register_script(_RENEW)
        self._cancel = connection.register_script(_CANCEL)
        self._feedback = connection.register_script(_FEEDBACK)

    # ------------------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------------------
    def get(self, video_id: str) -> Optional[dict[str, Any]]:
        raw = self.r.hgetall(REC.format(id=video_id))
        return decode_record(raw) if raw else None

    def get_owned(self, video_id: str, owner: str) -> Optional[dict[str, Any]]:
        """The record if it exists and belongs to `owner`; other owners' videos look absent."""
        rec = self.get(video_id)
        return rec if rec is not None and rec.get("owner") == owner else None

    def queue_position(self, rec: dict[str, Any]) -> Optional[int]:
        if rec["status"] != "queued":
            return None
        return self.queues.position(rec["model"], rec["priority"], rq_job_id(rec["id"], rec["attempt"]))

    def queue_depth(self, model: str) -> int:
        return self.queues.depth(model)

    # ------------------------------------------------------------------------------------------
    # API-side transitions
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _idempotency_key(owner: str, idempotency: "Idempotency") -> str:
        return IDEMPOTENCY.format(owner=owner, key=hashlib.sha256(idempotency.key.encode()).hexdigest()[:32])

    def _earlier(self, stored: Optional[bytes], idempotency: "Idempotency") -> Optional[dict[str, Any]]:
        """The video an Idempotency-Key already made (None if none, or if it is gone); a different request
        under the same key raises StoreError("idempotency_key_reused")."""
        if stored is None:
            return None
        earlier = json.loads(stored)
        if earlier["body_hash"] != idempotency.body_hash:
            raise StoreError("this Idempotency-Key was already used with a different request", "idempotency_key_reused")
        return self.get(earlier["video_id"])

    def replay(self, owner: str, idempotency: "Idempotency") -> Optional[dict[str, Any]]:
        """The earlier video of a retried create, looked up before any admission check (a retry of an
        accepted request must get its video back even when the queue has filled up since)."""
        return self._earlier(self.r.get(self._idempotency_key(owner, idempotency)), idempotency)

    def create(
        self,
        *,
        video_id: str,
        owner: str,
        resolved: ResolvedRequest,
        priority: str = "normal",
        metadata: Optional[dict[str, str]] = None,
        webhook_url: Optional[str] = None,
        webhook_events: Optional[list[str]] = None,
        input_image: Optional[str] = None,  # file name inside video_dir(video_id)
        idempotency: Optional[Idempotency] = None,
        remixed_from: Optional[str] = None,
        extends: Optional[dict[str, Any]] = None,  # {"video_id", "prefix_video" (file name), "prefix_frames"}
    ) -> tuple[dict[str, Any], bool]:
        """Write a queued record and its RQ job atomically. Returns (record, created).

        With an Idempotency-Key already used by this owner, returns the earlier video and
        created=False if the request is the same; raises StoreError("idempotency_key_reused") if
        it differs. Two concurrent identical requests create one video (WATCH on the key)."""
        now = time.time()
        rec: dict[str, Any] = {
            "id": video_id,
            "owner": owner,
            "model": resolved.model,
            "status": "queued",
            "stage": "queued",
            "progress": 0,
            "created_at": int(now),
            "enqueued_at": now,
            "completed_at": None,
            "expires_at": None,
            "resolved": resolved.model_dump(),
            "priority": priority,
            "metadata": metadata or {},
            "webhook_url": webhook_url,
            "webhook_events": webhook_events,
            "input_image": input_image,
            "remixed_from": remixed_from,
            "extended_from": extends["video_id"] if extends else None,
            "prefix_video": extends["prefix_video"] if extends else None,
            "prefix_frames": extends["prefix_frames"] if extends else 0,
            "attempt": 1,
            "runs": 0,
            "cancel_requested": False,
            "error": None,
            "timings": {},
        }
        idem_key = self._idempotency_key(owner, idempotency) if idempotency else None
        with self.r.pipeline() as pipe:
            while True:
                try:
                    if idem_key:
                        pipe.watch(idem_key)
                        existing = self._earlier(pipe.get(idem_key), idempotency)
                        if existing is not None:
                            return existing, False
                    pipe.multi()
                    pipe.hset(REC.format(id=video_id), mapping={k: _dumps(v) for k, v in rec.items()})
                    pipe.zadd(OWNER_INDEX.format(owner=owner), {video_id: now})
                    pipe.sadd(ACTIVE, video_id)
                    pipe.hincrby(METRICS, "created_total", 1)
                    if idem_key:
                        pipe.set(
                            idem_key,
                            _dumps({"video_id": video_id, "body_hash": idempotency.body_hash}),
                            ex=self.settings.idempotency_ttl,
                        )
                    self.queues.enqueue(pipe, resolved.model, priority, video_id, 1)
                    pipe.execute()
                    return rec, True
                except WatchError:
                    continue  # another request with the same key won the race: loop returns its video

    def cancel(self, video_id: str) -> dict[str, Any]:
        """Cancel a queued video now, or ask its worker to stop. Raises StoreError if it is finished."""
        rec = self.get(video_id)
        if rec is None:
            raise StoreError(f"no video {video_id}", "not_found")
        now = int(time.time())
        expires = now + self.settings.retention_seconds
        qkey = self.queues.for_model(rec["model"], rec["priority"]).key
        rq_id = rq_job_id(video_id, rec["attempt"])
        outcome = self._cancel(
            keys=[REC.format(id=video_id), ACTIVE, EXPIRY, qkey, Job.key_for(rq_id)],
            args=[video_id, rq_id, now, expires],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "gone":
            raise StoreError(f"no video {video_id}", "not_found")
        if outcome in TERMINAL_STATUSES:
            raise StoreError(f"video {video_id} already finished ({outcome}); nothing to cancel", "video_finished")
        rec = self.get(video_id) or rec
        if outcome == "cancelled_now":
            self.r.hincrby(METRICS, "finished_total:cancelled", 1)
            log.info("video %s cancelled while queued", video_id)
            notify.announce(self.r, self.settings, rec, "video.cancelled")
        else:
            log.info("video %s: cancel requested, its worker stops at the next step", video_id)
        return rec

    def set_feedback(self, video_id: str, **fields: Any) -> Optional[dict[str, Any]]:
        """Write the user's `rating` and/or `note` on a video (None clears one). Any status; the
        worker never writes these fields. Returns the record, or None if the video is gone."""
        unknown = set(fields) - {"rating", "note"}
        if unknown:
            raise ValueError(f"not feedback fields: {sorted(unknown)}")
        args: list[Any] = []
        for k, v in fields.items():
            args += [k, _dumps(v)]
        if args and not self._feedback(keys=[REC.format(id=video_id)], args=args):
            return None
        return self.get(video_id)

    def delete(self, video_id: str) -> None:
        """Remove a video, its files and its ticket; a running job is told to stop (it will find
        its record gone, write nothing and clean up its own output)."""
        rec = self.get(video_id)
        if rec is None:
            return
        if rec["status"] not in TERMINAL_STATUSES:
            try:
                self.cancel(video_id)
            except StoreError:
                pass  # finished in the meantime
        self._drop(video_id, rec.get("owner"))
        log.info("video %s deleted", video_id)

    def _drop(self, video_id: str, owner: Optional[str]) -> None:
        with self.r.pipeline() as p:
            p.delete(REC.format(id=video_id), LEASE.format(id=video_id), WEBHOOK_LOG.format(video_id=video_id))
            if owner:
                p.zrem(OWNER_INDEX.format(owner=owner), video_id)
            p.srem(ACTIVE, video_id)
            p.zrem(EXPIRY, video_id)
            p.execute()
        self.drop_files(video_id)

    def drop_files(self, video_id: str) -> None:
        shutil.rmtree(self.video_dir(video_id), ignore_errors=True)

    def video_dir(self, video_id: str) -> Path:
        return Path(self.settings.storage_dir) / video_id

    # ------------------------------------------------------------------------------------------
    # worker-side transitions (all fenced by attempt)
    # ------------------------------------------------------------------------------------------
    def lease_value(self, worker: str, attempt: int) -> str:
        return f"{worker}|{attempt}"

    def claim(self, video_id: str, attempt: int, worker: str) -> str:
        """queued -> in_progress for this attempt, taking the lease. Returns 'ok', 'gone' (deleted),
        'stale' (a newer attempt exists) or the status that made the claim pointless."""
        outcome = self._claim(
            keys=[REC.format(id=video_id), LEASE.format(id=video_id)],
            args=[
                attempt,
                self.lease_value(worker, attempt),
                int(self.settings.lease_seconds * 1000),
                _dumps(time.time()),
                _dumps(worker),
            ],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "ok":
            rec = self.get(video_id)
            if rec is not None:
                notify.announce(self.r, self.settings, rec, "video.in_progress")
        return outcome

    def renew_lease(self, video_id: str, attempt: int, worker: str) -> bool:
        """Extend the lease; False means it was lost (the sweep handed the job to someone else)."""
        return bool(
            self._renew(
                keys=[LEASE.format(id=video_id)],
                args=[self.lease_value(worker, attempt), int(self.settings.lease_seconds * 1000)],
            )
        )

    def update(self, video_id: str, attempt: int, **fields: Any) -> bool:
        """Write progress fields while the attempt still owns the video. False = stop working."""
        args: list[Any] = [attempt]
        for k, v in fields.items():
            args += [k, _dumps(v)]
        return bool(self._update(keys=[REC.format(id=video_id)], args=args))

    def stop_reason(self, video_id: str, attempt: int) -> Optional[str]:
        """Why the running attempt should stop now ('cancelled', 'gone', 'stale'), or None."""
        status, att, cancel = self.r.hmget(REC.format(id=video_id), "status", "attempt", "cancel_requested")
        if status is None:
            return "gone"
        if int(att) != attempt or json.loads(status) != "in_progress":
            return "stale"
        if json.loads(cancel):
            return "cancelled"
        return None

    def finish(
        self,
        video_id: str,
        attempt: int,
        status: str,
        *,
        error: Optional[dict[str, str]] = None,
        **fields: Any,
    ) -> Optional[dict[str, Any]]:
        """in_progress -> completed | failed | cancelled for this attempt. Returns the final record,
        or None when the attempt no longer owns the video (then nothing was written)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish() takes a final status, not {status!r}")
        now = int(time.time())
        expires = now + self.settings.retention_seconds
        values = dict(fields, status=status, error=error, completed_at=now, expires_at=expires)
        if status == "completed":
            values.update(progress=100, stage=None)
        args: list[Any] = [attempt, video_id, expires]
        for k, v in values.items():
            args += [k, _dumps(v)]
        done = self._finish(
            keys=[REC.format(id=video_id), LEASE.format(id=video_id), ACTIVE, EXPIRY], args=args
        )
        if not done:
            return None
        rec = self.get(video_id)
        if rec is None:  # deleted between the finish script and this read: nothing left to announce
            return None
        self._count_finish(rec)
        notify.announce(self.r, self.settings, rec, notify.event_for_status(status))
        return rec

    def _count_finish(self, rec: Optional[dict[str, Any]]) -> None:
        if rec is None:
            return
        stages = {name for name, _ in STAGES}
        with self.r.pipeline(transaction=False) as p:
            p.hincrby(METRICS, f"finished_total:{rec['status']}", 1)
            for stage, seconds in (rec.get("timings") or {}).items():
                if stage in stages or stage in ("image_encode", "queue_wait", "total"):
                    p.hincrbyfloat(METRICS, f"stage_seconds_sum:{stage}", float(seconds))
                    p.hincrby(METRICS, f"stage_seconds_count:{stage}", 1)
            p.execute()

    # ------------------------------------------------------------------------------------------
    # maintenance: recover jobs of dead workers, expire old videos
    # ------------------------------------------------------------------------------------------
    def sweep(self) -> dict[str, int]:
        """One pass of recovery and expiry; cheap enough to run every few seconds on every worker
        (races between sweepers are settled by WATCH)."""
        return {"recovered": self.recover_orphans(), "expired": self.expire()}

    def recover_orphans(self) -> int:
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.r.smembers(ACTIVE)]
        if not ids:
            return 0
        with self.r.pipeline(transaction=False) as p:
            for vid in ids:
                p.hmget(REC.format(id=vid), "status", "enqueued_at", "model", "priority", "attempt")
                p.exists(LEASE.format(id=vid))
            replies = p.execute()
        handled = 0
        now = time.time()
        long_queued = []  # (id, model, priority, rq id) of videos queued longer than a lease
        for i, vid in enumerate(ids):
            (status, enqueued_at, model, priority, attempt), has_lease = replies[2 * i], replies[2 * i + 1]
            if status is None:
                self.r.srem(ACTIVE, vid)  # deleted meanwhile
                continue
            status = json.loads(status)
            if status == "in_progress" and not has_lease:
                handled += self._recover(vid, reason="its worker stopped renewing the lease")
            elif status == "queued" and now - json.loads(enqueued_at) > self.settings.lease_seconds:
                long_queued.append((vid, json.loads(model), json.loads(priority), rq_job_id(vid, int(attempt))))
        # A worker that died between popping a ticket and claiming its video leaves it queued with
        # no ticket anywhere; those get a new ticket.
        present = self.queues.contains_many([(m, p, rq_id) for _, m, p, rq_id in long_queued])
        for (vid, *_), found in zip(long_queued, present):
            if not found:
                handled += self._recover(vid, reason="its ticket left the queue but no worker claimed it")
        return handled

    def _recover(self, video_id: str, reason: str) -> int:
        """Re-enqueue (attempt + 1) or fail a video whose worker vanished. Returns 1 if it acted."""
        rkey, lkey = REC.format(id=video_id), LEASE.format(id=video_id)
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(rkey, lkey)
                raw = pipe.hgetall(rkey)
                if not raw or pipe.exists(lkey):
                    return 0
                rec = decode_record(raw)
                if rec["status"] not in ("queued", "in_progress"):
                    return 0
                now = time.time()
                attempt = int(rec["attempt"]) + 1
                pipe.multi()
                terminal: Optional[str] = None
                if rec.get("cancel_requested"):
                    terminal = "cancelled"
                elif rec["runs"] > self.settings.max_retries:
                    terminal = "failed"
                    rec["error"] = {
                        "code": "worker_lost",
                        "message": f"the worker running this video died {rec['runs']} times; giving up",
                    }
                if terminal:
                    expires = int(now) + self.settings.retention_seconds
                    rec.update(status=terminal, stage=None, completed_at=int(now), expires_at=expires)
                    pipe.hset(rkey, mapping={k: _dumps(rec[k]) for k in
                                             ("status", "stage", "completed_at", "expires_at", "error")})
                    pipe.srem(ACTIVE, video_id)
                    pipe.zadd(EXPIRY, {video_id: expires})
                else:
                    rec.update(status="queued", stage="queued", progress=0, step=None, attempt=attempt,
                               enqueued_at=now, worker=None)
                    pipe.hset(rkey, mapping={k: _dumps(rec[k]) for k in
                                             ("status", "stage", "progress", "step", "attempt", "enqueued_at",
                                              "worker")})
                    self.queues.enqueue(pipe, rec["model"], rec["priority"], video_id, attempt, at_front=True)
                pipe.execute()
            except WatchError:
                return 0  # someone else moved it (its worker came back, or another sweeper acted)
        if terminal:
            log.warning("video %s %s: %s", video_id, terminal, reason)
            self._count_finish(rec)
            notify.announce(self.r, self.settings, rec, notify.event_for_status(terminal))
        else:
            log.warning("video %s re-queued as attempt %d: %s", video_id, attempt, reason)
        return 1

    def expire(self, now: Optional[float] = None) -> int:
        """Delete finished videos (records and files) past their expires_at."""
        now = time.time() if now is None else now
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.r.zrangebyscore(EXPIRY, "-inf", now)]
        for vid in ids:
            owner = self.r.hget(REC.format(id=vid), "owner")
            self._drop(vid, json.loads(owner) if owner else None)
        if ids:
            log.info("expired %d video(s)", len(ids))
        return len(ids)

    # ------------------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.r.hgetall(METRICS).items()}

    def active_counts(self) -> dict[str, int]:
        """queued / in_progress videos right now."""
        ids = self.r.smembers(ACTIVE)
        counts = {"queued": 0, "in_progress": 0}
        with self.r.pipeline(transaction=False) as p:
            for vid in ids:
                p.hget(REC.format(id=vid.decode()), "status")
            for status in p.execute():
                if status is not None:
                    s = json.loads(status)
                    if s in counts:
                        counts[s] += 1
        return counts
