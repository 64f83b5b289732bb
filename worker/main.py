"""The GPU worker: `turbodiffusion worker --model M [--model M2] [--device cuda:0] [--quant int8]`.

An RQ SimpleWorker subclass (no fork: CUDA and resident weights do not survive fork()) that
loads its pipelines once, then takes video jobs only from its models' queues, high priority
first. A pulse thread (worker.pulse) heartbeats, renews the running job's lease and sweeps for
jobs of dead workers. The same code runs as a process (this CLI) or as a thread inside
`turbodiffusion serve` (EmbeddedWorker).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import threading
from typing import Any, Callable, Optional

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from server import fleet
from server.queues import SERIALIZER, queue_names_for
from server.redis_client import connect
from server.settings import Settings
from server.store import Store
from turbodiffusion_core.spec import ATTENTION_TYPES, PRESETS, get_preset
from worker import runtime
from worker.pulse import Pulse
from worker.residency import Residency
from worker.runtime import Runtime

log = logging.getLogger("turbodiffusion.worker")

POLL_SECONDS = 1
"""Longest blocking pop, so a stop request is noticed within about a second."""


class CooperativeTimeout(BaseDeathPenalty):
    """RQ's death penalty, switched off. RQ would raise inside the job via SIGALRM (main thread
    only, and unsafe in the middle of a CUDA call); instead the job checks TD_JOB_TIMEOUT itself
    between steps (worker.tasks.JobRun.should_cancel) and fails with code "timeout"."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class VideoWorker(SimpleWorker):
    """Runs video jobs in its own thread (no fork), from its models' queues, high priority first."""

    death_penalty_class = CooperativeTimeout

    def __init__(self, rt: Runtime, **kwargs: Any):
        queues = [Queue(n, connection=rt.store.r, serializer=SERIALIZER) for n in queue_names_for(rt.residency.models)]
        super().__init__(queues, name=rt.name, connection=rt.store.r, serializer=SERIALIZER, **kwargs)
        self.rt = rt

    def stop(self) -> None:
        """Finish the current job (if any), then leave the work loop."""
        self._stop_requested = True

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()  # SIGINT/SIGTERM: warm shutdown after the current job

    def dequeue_job_and_maintain_ttl(self, timeout: Optional[int], max_idle_time: Optional[int] = None):
        """Wait for a job in POLL_SECONDS slices so stop() is honoured promptly; None once stopped."""
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(POLL_SECONDS, POLL_SECONDS)
            if result is not None:
                return result
        return None

    def execute_job(self, job: Job, queue: Queue) -> None:
        runtime.bind(self.rt)
        execution = self.prepare_execution(job)
        self.rt.rq_job, self.rt.rq_execution = job, execution
        try:
            self.perform_job(job, queue, execution)
        finally:
            self.rt.rq_job = self.rt.rq_execution = None
            self.set_state(WorkerStatus.IDLE)


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def build_runtime(
    settings: Settings,
    models: list[str],
    *,
    device: str = "auto",
    attention: str = "auto",
    quant: Optional[str] = None,
    name: Optional[str] = None,
    residency: Optional[Residency] = None,
) -> Runtime:
    """Connect to Redis and load the pipelines (slow: this is where weights are read)."""
    for model in models:
        get_preset(model)
    connection = connect(settings.require_redis_url(), health_check_interval=30)
    residency = residency or Residency.load(models, models_dir=settings.models_dir, device=device,
                                            attention=attention, quant=quant)
    return Runtime(name=name or worker_name(), settings=settings, store=Store(connection, settings),
                   residency=residency)


def work(
    rt: Runtime,
    on_ready: Optional[Callable[[], None]] = None,
    on_worker: Optional[Callable[[VideoWorker], None]] = None,
) -> None:
    """Register, heartbeat and process jobs in the calling thread until stopped."""
    worker = VideoWorker(rt)
    if on_worker:
        on_worker(worker)
    info = {"models": rt.residency.describe(), "host": socket.gethostname(), "pid": os.getpid(),
            "queues": worker.queue_names()}
    pulse = Pulse(rt, worker, info)
    pulse.beat()  # visible in /v1/models before the first job
    pulse.start()
    log.info("worker %s serving %s", rt.name, ", ".join(rt.residency.models))
    if on_ready:
        on_ready()
    try:
        worker.work(logging_level=rt.settings.log_level)
    finally:
        pulse.stop()
        pulse.join(timeout=5)
        fleet.unregister(rt.store.r, rt.name)
        log.info("worker %s stopped", rt.name)


class EmbeddedWorker:
    """A worker on a thread of the current process (used by `turbodiffusion serve` and tests).
    A thread, not a forked process: the process may already have initialised CUDA.

    `build` makes the Runtime (loading the models) on the worker's own thread, so the caller can
    go on (serve starts the API meanwhile) or wait for `start(wait=...)`."""

    def __init__(self, build: Callable[[], Runtime], name: str = "worker",
                 on_error: Optional[Callable[[BaseException], None]] = None):
        self._build = build
        self._on_error = on_error
        self._worker: Optional[VideoWorker] = None
        self._stopping = False
        self._ready = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            rt = self._build()
            if not self._stopping:
                work(rt, on_ready=self._ready.set, on_worker=self._set_worker)
        except BaseException as exc:  # report to whoever waits in start(), and to on_error
            self.error = exc
            log.exception("embedded worker crashed")
            if self._on_error is not None and not self._stopping:
                self._on_error(exc)
        finally:
            self._ready.set()

    def _set_worker(self, worker: VideoWorker) -> None:
        self._worker = worker
        if self._stopping:
            worker.stop()

    def start(self, wait: Optional[float] = 120.0) -> "EmbeddedWorker":
        """Start the thread; with `wait`, block until the worker takes jobs (or raise)."""
        self._thread.start()
        if wait is not None:
            if not self._ready.wait(wait):
                raise TimeoutError(f"worker did not start within {wait} s")
            if self.error is not None:
                raise RuntimeError("worker failed to start") from self.error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current job finish, then end the thread."""
        self._stopping = True
        if self._worker is not None:
            self._worker.stop()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `worker` subcommand; its handler is `args.func(args) -> int`."""
    parser = subparsers.add_parser(
        "worker",
        help="run a GPU worker that keeps models resident and generates queued videos",
        description=(
            "Load the given models once, then generate videos from their Redis queues (high, normal, "
            "low priority) until stopped with Ctrl+C (the current video is finished first). "
            "Settings come from TD_* environment variables (TD_REDIS_URL, TD_STORAGE_DIR, "
            "TD_MODELS_DIR, TD_JOB_TIMEOUT, TD_MAX_RETRIES, TD_LEASE_SECONDS, ...); the storage "
            "folder must be the one the API serves files from."
        ),
    )
    parser.add_argument("--model", action="append", required=True, choices=list(PRESETS), metavar="MODEL",
                        help=f"model to serve (repeatable): {', '.join(PRESETS)}")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    parser.add_argument("--quant", default=None, choices=("none", "int8", "fp8", "auto"),
                        help="quantize the DiT linears: int8 (the released -quant format), fp8, or auto (bf16 when it "
                             "fits in free GPU memory beside the text encoder, else fp8/int8); default none (bf16)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_TYPES,
                        help="attention backend (default %(default)s: the fastest available)")
    parser.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    parser.add_argument("--redis-url", default=None, help="overrides TD_REDIS_URL")
    parser.add_argument("--models-dir", default=None, help="overrides TD_MODELS_DIR")
    parser.add_argument("--storage-dir", default=None, help="overrides TD_STORAGE_DIR")
    parser.add_argument("--gpus", default=None,
                        help="serve each video on this group of GPUs with sequence parallelism, e.g. 0,1,2,3 "
                             "(one worker process owns the group; see worker/group.py)")
    parser.set_defaults(func=_run_from_args, ranks=None)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("redis_url", args.redis_url), ("models_dir", args.models_dir),
                                   ("storage_dir", args.storage_dir)) if v}
    return Settings(**overrides)


def _run_from_args(args: argparse.Namespace) -> int:
    if getattr(args, "gpus", None):
        from worker.group import run as run_group

        return run_group(args)
    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        log.error("set TD_REDIS_URL (or --redis-url) to the Redis the API uses")
        return 2
    rt = build_runtime(settings, args.model, device=args.device, attention=args.attention, quant=args.quant,
                       name=args.name)
    work(rt)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m worker.main --model M ...`: the subcommand without the `turbodiffusion` dispatcher."""
    parser = argparse.ArgumentParser(prog="python -m worker.main")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["worker", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
