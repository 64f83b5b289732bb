"""GET /v1/videos/{id}/events: server-sent events with the video object each time it changes.

The stream polls the record (a cheap HMGET) every POLL_SECONDS on the async Redis client, sends
`event: video` with the full public object whenever status, stage, step, progress or (about once a
second, while queued) the queue position moved, and
ends after the terminal state. A comment line every KEEPALIVE_SECONDS keeps proxies from closing
an idle stream. Polling rather than pub/sub keeps the worker's write path a single Lua call and
cannot miss an update that happened before the client subscribed.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Optional

from server.reads import VideoReads
from server.store import REC
from server.views import public_video
from turbodiffusion_core.spec import TERMINAL_STATUSES

POLL_SECONDS = 0.2
KEEPALIVE_SECONDS = 15.0
POSITION_SECONDS = 1.0
QUEUED = json.dumps("queued").encode()  # record fields are stored JSON-encoded
WATCHED = ("status", "stage", "step", "progress")


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def video_events(reads: VideoReads, video_id: str, owner: str, max_seconds: float) -> AsyncIterator[bytes]:
    """Yield SSE frames until the video finishes, disappears, or max_seconds pass."""
    key = REC.format(id=video_id)
    last: Optional[tuple] = None
    last_sent = time.monotonic()
    deadline = last_sent + max_seconds
    yield b"retry: 1000\n\n"
    last_position: Optional[int] = None
    next_position_check = 0.0
    while time.monotonic() < deadline:
        snapshot = tuple(await reads.r.hmget(key, *WATCHED))
        # A queued video's record does not change while the videos ahead of it leave the queue: re-read
        # its position about once a second and send an update when it moved.
        check_position = snapshot[0] == QUEUED and time.monotonic() >= next_position_check
        if snapshot != last or check_position:
            found = await reads.get_owned(video_id, owner)
            if found is None:
                yield sse("error", {"code": "video_not_found", "message": f"video {video_id} no longer exists"})
                return
            rec, deliveries = found
            position = await reads.queue_position(rec)
            next_position_check = time.monotonic() + POSITION_SECONDS
            if snapshot == last and position == last_position:
                await asyncio.sleep(POLL_SECONDS)
                continue
            last, last_position = snapshot, position
            view = public_video(rec, queue_position=position, deliveries=deliveries)
            yield sse("video", view)
            last_sent = time.monotonic()
            if rec["status"] in TERMINAL_STATUSES:
                yield sse("done", {"id": video_id, "status": view["status"]})
                return
        elif time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield b": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
