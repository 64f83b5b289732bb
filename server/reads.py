"""The API's hot read paths (retrieve, list), on the async Redis client.

Pollers call GET /v1/videos/{id} over and over (the SDK every openai-poll-after-ms), so these
reads run on the event loop with one pipelined round trip, instead of hopping to a thread for the
synchronous client. They read the layout that server.store writes; nothing here writes.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from redis.asyncio import Redis as AsyncRedis

from server.queues import combine_position, position_keys, rq_job_id
from server.store import OWNER_INDEX, REC, decode_record
from server.webhooks import LOG_KEY as WEBHOOK_LOG


class CursorError(ValueError):
    """`after` names no video of this list."""


class VideoReads:
    def __init__(self, connection: AsyncRedis):
        self.r = connection

    async def get_owned(self, video_id: str, owner: str) -> Optional[tuple[dict[str, Any], list[dict]]]:
        """(record, webhook delivery log) if the video exists and belongs to `owner`, else None."""
        async with self.r.pipeline(transaction=False) as p:
            p.hgetall(REC.format(id=video_id))
            p.lrange(WEBHOOK_LOG.format(video_id=video_id), 0, -1)
            raw, log = await p.execute()
        if not raw:
            return None
        rec = decode_record(raw)
        if rec.get("owner") != owner:
            return None
        return rec, [json.loads(entry) for entry in log]

    async def queue_position(self, rec: dict[str, Any]) -> Optional[int]:
        if rec["status"] != "queued":
            return None
        higher, own = position_keys(rec["model"], rec["priority"])
        async with self.r.pipeline(transaction=False) as p:
            for key in higher:
                p.llen(key)
            p.lpos(own, rq_job_id(rec["id"], rec["attempt"]))
            return combine_position(await p.execute())

    async def page(
        self, owner: str, after: Optional[str] = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the owner's videos by creation time, and whether more follow (cursor = `after`)."""
        key = OWNER_INDEX.format(owner=owner)
        desc = order == "desc"
        start = 0
        if after:
            rank = await (self.r.zrevrank(key, after) if desc else self.r.zrank(key, after))
            if rank is None:
                raise CursorError(f"after: no video {after!r} in this list")
            start = int(rank) + 1
        end = start + limit  # one extra, to learn has_more
        ids = await (self.r.zrevrange(key, start, end) if desc else self.r.zrange(key, start, end))
        has_more = len(ids) > limit
        async with self.r.pipeline(transaction=False) as p:
            for vid in ids[:limit]:
                p.hgetall(REC.format(id=vid.decode()))
            records = await p.execute()
        return [decode_record(raw) for raw in records if raw], has_more
