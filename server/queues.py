"""RQ queues: one per (model, priority), so a job only reaches a worker that holds its model.

Workers listen on their models' queues in priority order (high, normal, low); RQ pops from the
first non-empty queue, which is what gives priorities their meaning. The RQ job is only a
delivery ticket `run_video(video_id, attempt)`: the video's record in Redis (server.store) is the
source of truth, so RQ results are not kept and RQ's own retry machinery is not used (the
store's sweep re-enqueues jobs whose worker died, with a new attempt number).

Imports neither FastAPI nor torch; the API enqueues by function path so it never imports worker/.
"""

from __future__ import annotations

from typing import Optional

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.serializers import JSONSerializer

from turbodiffusion_core.spec import PRIORITIES

TASK_PATH = "worker.tasks.run_video"
"""What the RQ job calls, as a dotted path (resolved only inside the worker process)."""

QUEUE_PREFIX = "td-video"
SERIALIZER = JSONSerializer
"""JSON, not pickle: the payload is two plain values and a JSON job can't smuggle code."""


def queue_name(model: str, priority: str = "normal") -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
    return f"{QUEUE_PREFIX}:{model}:{priority}"


def queue_names_for(models: list[str]) -> list[str]:
    """The queues a worker serving `models` listens on: every high queue first, then normal, then low."""
    return [queue_name(m, p) for p in PRIORITIES for m in models]


def rq_job_id(video_id: str, attempt: int) -> str:
    """One RQ job per attempt, so a retried video never collides with its dead predecessor."""
    return f"{video_id}-a{attempt}"  # RQ ids allow letters, digits, "_" and "-" only


def queue_key(name: str) -> str:
    return Queue.redis_queue_namespace_prefix + name


def position_keys(model: str, priority: str) -> tuple[list[str], str]:
    """Redis keys to read for a queue position: the higher-priority queues (LLEN) and the job's own
    queue (LPOS). Shared by the synchronous store and the API's async reads."""
    higher = [queue_key(queue_name(model, p)) for p in PRIORITIES[: PRIORITIES.index(priority)]]
    return higher, queue_key(queue_name(model, priority))


def combine_position(replies: list) -> Optional[int]:
    """[LLEN of each higher queue..., LPOS in the own queue] -> position, or None if not queued."""
    *lengths, pos = replies
    return None if pos is None else sum(int(n) for n in lengths) + int(pos)


class Queues:
    """Caches RQ Queue objects per name (creating one costs a Redis INFO round trip)."""

    def __init__(self, connection: Redis, job_timeout: int):
        self.connection = connection
        self.job_timeout = job_timeout
        self._queues: dict[str, Queue] = {}

    def get(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = Queue(name, connection=self.connection, serializer=SERIALIZER)
            self._queues[name] = q
        return q

    def for_model(self, model: str, priority: str) -> Queue:
        return self.get(queue_name(model, priority))

    def enqueue(
        self, pipe: Pipeline, model: str, priority: str, video_id: str, attempt: int, at_front: bool = False
    ) -> str:
        """Add the job inside the caller's MULTI transaction (`pipe`), so the record and its RQ job
        appear together or not at all. Returns the RQ job id."""
        queue = self.for_model(model, priority)
        job = queue.create_job(
            TASK_PATH,
            args=(video_id, attempt),
            job_id=rq_job_id(video_id, attempt),
            # RQ's timeout only sizes its started-registry TTL; the worker enforces job_timeout itself
            # between steps (a signal can't interrupt a CUDA call safely, nor reach a worker thread).
            timeout=self.job_timeout + 60,
            result_ttl=0,
            failure_ttl=self.job_timeout + 3600,
            description=f"video {video_id} attempt {attempt}",
        )
        queue.enqueue_job(job, pipeline=pipe, at_front=at_front)
        return job.id

    def depth(self, model: str, priority: Optional[str] = None) -> int:
        """Queued jobs of a model (one priority, or all)."""
        priorities = [priority] if priority else list(PRIORITIES)
        with self.connection.pipeline(transaction=False) as p:
            for prio in priorities:
                p.llen(self.for_model(model, prio).key)
            return sum(p.execute())

    def position(self, model: str, priority: str, rq_id: str) -> Optional[int]:
        """0-based place in line: jobs ahead in the same queue plus everything in higher priorities."""
        higher, own = position_keys(model, priority)
        with self.connection.pipeline(transaction=False) as p:
            for key in higher:
                p.llen(key)
            p.lpos(own, rq_id)
            return combine_position(p.execute())

    def contains_many(self, tickets: list[tuple[str, str, str]]) -> list[bool]:
        """For each (model, priority, rq job id): is the ticket still waiting in its queue?"""
        if not tickets:
            return []
        with self.connection.pipeline(transaction=False) as p:
            for model, priority, rq_id in tickets:
                p.lpos(self.for_model(model, priority).key, rq_id)
            return [pos is not None for pos in p.execute()]

    def known_models(self) -> list[str]:
        """Models that have (or had) a queue in this Redis, from RQ's set of queue keys."""
        prefix = Queue.redis_queue_namespace_prefix + QUEUE_PREFIX + ":"
        models = set()
        for raw in self.connection.smembers(Queue.redis_queues_keys):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if key.startswith(prefix):
                models.add(key[len(prefix) :].rsplit(":", 1)[0])
        return sorted(models)

