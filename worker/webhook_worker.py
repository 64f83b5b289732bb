"""The webhook delivery worker: an RQ worker on `WEBHOOK_QUEUE` that also runs its own retry scheduler.

Webhooks get their own queue and worker so that a slow or dead receiver never holds up a GPU.
Failed attempts are re-queued with `Queue.enqueue_at`, which puts them in RQ's scheduled-job
registry; something must move them back onto the queue when they fall due. RQ's `--with-scheduler`
does that in a *forked* process, which does not suit us: `turbodiffusion serve` runs this worker
in a thread of a process that may hold CUDA, and a forked scheduler outlives a burst run. So this
worker moves due jobs itself, between dequeues, under RQ's own per-queue scheduler lock (several
webhook workers can run; one schedules at a time).

`SimpleWorker` (no fork per job) is enough: a delivery is one HTTP request. Outside the main
thread the worker installs no signal handlers and times jobs out with a timer instead of SIGALRM;
stop it there through `stop_event`.

Between dequeues it also sweeps for attempts abandoned by a dead webhook worker and queues them
again (server.webhooks.requeue_abandoned), so a delivery survives its worker being killed.

`burst=True` means "drain": deliver everything queued *and* every retry scheduled (and every attempt
in progress elsewhere, until it ends or is found abandoned), then return.
That is what tests and one-off flushes want; RQ's own burst mode would quit with retries pending.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, Optional

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.timeouts import TimerDeathPenalty

from server.redis_client import connect
from server.webhooks import WEBHOOK_QUEUE, earliest_score, next_lease_deadline, requeue_abandoned

log = logging.getLogger("turbodiffusion.webhook_worker")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
POLL_INTERVAL_S = 1


class WebhookWorker(SimpleWorker):
    """A `SimpleWorker` that schedules its own retries in-process and can run in any thread."""

    def __init__(
        self,
        queues: list[Queue],
        *,
        connection: Redis,
        stop_event: Optional[threading.Event] = None,
        drain: bool = False,
        poll_interval: int = POLL_INTERVAL_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(queues, connection=connection, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            self.death_penalty_class = TimerDeathPenalty  # SIGALRM only works in the main thread
        self._stop_event = stop_event or threading.Event()
        self._drain = drain
        self._poll_interval = max(1, int(poll_interval))
        self._retry_scheduler = RQScheduler(self.queues, connection=connection, interval=self._poll_interval)
        self._previous_handlers: dict[int, Any] = {}

    def _install_signal_handlers(self) -> None:
        """RQ's SIGINT/SIGTERM handlers (warm shutdown), main thread only; `teardown` puts the
        previous handlers back, so embedding the worker leaves the host process as it was."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            super()._install_signal_handlers()

    def request_stop(self, signum: Any, frame: Any) -> None:
        self._stop_event.set()
        super().request_stop(signum, frame)

    def dequeue_job_and_maintain_ttl(
        self, timeout: Optional[int], max_idle_time: Optional[int] = None
    ) -> Optional[tuple[Job, Queue]]:
        """Wait for the next job, moving due retries onto the queue while waiting.

        Returns None (which ends `work()`) once stopped, or in drain mode once nothing is queued
        or scheduled. The blocking pop is cut into `poll_interval` slices so that scheduled
        retries and the stop event are looked at regularly.
        """
        while not (self._stop_event.is_set() or self._stop_requested):
            self._enqueue_due_retries()
            requeue_abandoned(self.connection)
            if self._drain:
                result = super().dequeue_job_and_maintain_ttl(None)
                if result is not None:
                    return result
                # an attempt another worker holds is pending work too: it may be abandoned
                due = [t for t in (self._next_scheduled_time(), next_lease_deadline(self.connection)) if t is not None]
                next_due = min(due) if due else None
                if next_due is None:
                    return None
                self._stop_event.wait(min(self._poll_interval, max(0.05, next_due - time.time())))
            else:
                result = super().dequeue_job_and_maintain_ttl(self._poll_interval, self._poll_interval)
                if result is not None:
                    return result
        return None

    def _enqueue_due_retries(self) -> None:
        scheduler = self._retry_scheduler
        if scheduler.should_reacquire_locks:
            scheduler.acquire_locks()
        if scheduler.acquired_locks:
            scheduler.heartbeat()
            scheduler.enqueue_scheduled_jobs()

    def _next_scheduled_time(self) -> Optional[float]:
        """Unix time of the earliest scheduled retry on our queues, or None if there is none."""
        times = [earliest_score(self.connection, ScheduledJobRegistry(queue=queue).key) for queue in self.queues]
        return min((t for t in times if t is not None), default=None)

    def teardown(self) -> None:
        super().teardown()
        self._retry_scheduler.release_locks()
        self._retry_scheduler.register_death()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)


def run_webhook_worker(
    redis_conn: Redis,
    *,
    burst: bool = False,
    stop_event: Optional[threading.Event] = None,
    poll_interval: int = POLL_INTERVAL_S,
    name: Optional[str] = None,
    logging_level: str = "INFO",
) -> bool:
    """Deliver webhooks from `WEBHOOK_QUEUE` until stopped (or, with `burst`, until drained).

    Call it from a CLI process or from a thread (then set `stop_event` to end it; it returns
    within about `poll_interval` seconds, after finishing a delivery in progress).
    Returns whether any delivery job ran.
    """
    queue = Queue(WEBHOOK_QUEUE, connection=redis_conn)
    worker = WebhookWorker(
        [queue],
        connection=redis_conn,
        stop_event=stop_event,
        drain=burst,
        poll_interval=poll_interval,
        name=name,
    )
    return worker.work(burst=burst, logging_level=logging_level)


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `webhook-worker` subcommand; its handler is `args.func(args) -> int`."""
    parser = subparsers.add_parser(
        "webhook-worker",
        help="deliver signed webhooks from Redis (no GPU needed)",
        description=(
            f"Deliver signed webhook events from the RQ queue '{WEBHOOK_QUEUE}', retrying failed "
            "deliveries with backoff. Retries are scheduled by this worker itself, so no separate "
            "RQ scheduler is needed. Run one or more next to the API and GPU workers."
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TD_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"Redis to take jobs from (default: $TD_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument("--burst", action="store_true", help="deliver everything queued or scheduled, then exit")
    parser.add_argument("--poll-interval", type=int, default=POLL_INTERVAL_S,
                        help="seconds between looks at scheduled retries (default %(default)s)")
    parser.add_argument("--name", default=None, help="worker name shown in RQ tools (default: random)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=_run_from_args)
    return parser


def _run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redis_conn = connect(args.redis_url)
    where = redis_conn.connection_pool.connection_kwargs  # logged without the URL's password
    log.info("webhook worker on redis %s:%s/%s, queue %s", where.get("host"), where.get("port"), where.get("db"),
             WEBHOOK_QUEUE)
    run_webhook_worker(
        redis_conn, burst=args.burst, poll_interval=args.poll_interval, name=args.name, logging_level=args.log_level
    )
    return 0
