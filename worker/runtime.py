"""What a running worker knows, shared by its RQ loop, its job function and its pulse thread.

RQ calls the job function by dotted path with only (video_id, attempt), so the function finds
its worker's resident pipelines through a thread-local binding: each worker thread binds its
Runtime before executing a job. Several workers can thus live in one process (threads), each
with its own pipelines and name.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from server.settings import Settings
from server.store import Store
from worker.residency import Residency


@dataclass
class CurrentJob:
    """The video a worker has claimed and is generating (read by the pulse thread)."""

    video_id: str
    attempt: int
    started: float = field(default_factory=time.monotonic)
    lost: threading.Event = field(default_factory=threading.Event)  # set when the lease could not be renewed


@dataclass
class Runtime:
    name: str
    settings: Settings
    store: Store
    residency: Residency
    current: Optional[CurrentJob] = None  # set by the job function once its claim succeeded
    rq_job: Any = None  # the RQ job and execution being performed, for RQ's own heartbeats
    rq_execution: Any = None


_local = threading.local()


def bind(runtime: Runtime) -> None:
    _local.runtime = runtime


def current() -> Runtime:
    runtime = getattr(_local, "runtime", None)
    if runtime is None:
        raise RuntimeError("no worker runtime bound to this thread: run jobs through worker.main.VideoWorker")
    return runtime
