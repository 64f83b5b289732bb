"""The Redis connections of the API and the workers: every command that meets a dead connection (Redis
restarted, a pooled socket gone stale) is sent again on a fresh one, a few times with a short backoff,
instead of failing the request or the job. The API also bounds each wait, so a Redis that stops answering
becomes a 503 (server.errors) rather than a request that hangs; workers block on their queues and keep
no socket timeout."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import ExponentialBackoff

RETRIES = 2
API_TIMEOUTS = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.5, base=0.05)


def connect(url: str, *, api: bool = False, **kwargs: Any) -> Redis:
    """A client for `url` with retries (and, for the API, bounded socket waits)."""
    from redis.retry import Retry

    options = dict(API_TIMEOUTS) if api else {}
    options.update(kwargs)
    return Redis.from_url(url, retry=Retry(_backoff(), RETRIES), **options)


def connect_async(url: str, **kwargs: Any) -> AsyncRedis:
    """The API's asyncio client, with the same retries and socket waits."""
    from redis.asyncio.retry import Retry

    return AsyncRedis.from_url(url, retry=Retry(_backoff(), RETRIES), **{**API_TIMEOUTS, **kwargs})
