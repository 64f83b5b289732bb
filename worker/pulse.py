"""The worker's heartbeat thread.

RQ's SimpleWorker runs a job in its own thread and sends no heartbeat while it does, and a GPU
job can run for minutes. This thread, beating every `interval` seconds for the worker's whole
life, keeps everyone informed:
- the fleet registry entry (server.fleet): which models this worker holds, for /v1/models;
- the running video's lease (server.store): if renewal fails the sweep has given the video to
  another worker, so the job is told to stop (CurrentJob.lost);
- RQ's own bookkeeping (worker key TTL, started-registry entry, job heartbeat), so RQ tools don't
  see a busy worker as dead;
- and every `sweep_interval`, the store's sweep: re-enqueue videos of dead workers, expire old ones.
"""

from __future__ import annotations

import logging
import threading
import time

from redis.exceptions import RedisError

from server import fleet
from worker.runtime import Runtime

log = logging.getLogger("turbodiffusion.worker")


class Pulse(threading.Thread):
    def __init__(self, rt: Runtime, rq_worker, info: dict):
        super().__init__(name=f"pulse-{rt.name}", daemon=True)
        self.rt = rt
        self.rq_worker = rq_worker
        self.info = info
        s = rt.settings
        self.interval = max(0.05, min(s.lease_seconds / 3, s.sweep_interval))
        self.presence_ttl = max(3 * self.interval, s.lease_seconds)
        self._halt = threading.Event()
        self._last_sweep = 0.0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except RedisError as exc:  # Redis hiccup: keep beating, the next beat may get through
                log.warning("pulse of %s: redis error: %s", self.rt.name, exc)
            except Exception:
                log.exception("pulse of %s failed", self.rt.name)
            if self._halt.wait(self.interval):
                return

    def beat(self) -> None:
        rt = self.rt
        job = rt.current
        fleet.register(rt.store.r, rt.name, dict(self.info, busy=job.video_id if job else None),
                       ttl=self.presence_ttl)
        if job is not None and not job.lost.is_set():
            if not rt.store.renew_lease(job.video_id, job.attempt, rt.name) and rt.current is job:
                job.lost.set()
                log.warning("video %s: lease lost by %s; it will stop at the next step", job.video_id, rt.name)
        if rt.rq_job is not None and rt.rq_execution is not None:
            self.rq_worker.maintain_heartbeats(rt.rq_job, rt.rq_execution)
        if time.monotonic() - self._last_sweep >= rt.settings.sweep_interval:
            self._last_sweep = time.monotonic()
            rt.store.sweep()
