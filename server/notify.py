"""Turn a video's status change into a webhook event, if the video (or the server) asked for one.

Called by the store right after a transition commits. Delivery itself happens on the webhook
RQ queue (server.webhooks), so this never blocks a GPU worker or an API request on the network.
"""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis

from server.settings import Settings
from server.views import public_video
from server.webhooks import DEFAULT_EVENT_TYPES, enqueue_event

log = logging.getLogger("turbodiffusion.server")


def event_for_status(status: str) -> str:
    return f"video.{status}"


def announce(connection: Redis, settings: Settings, rec: dict[str, Any], event_type: str) -> None:
    """Queue `event_type` for the video's webhook URL (its own, else the server default)."""
    url = rec.get("webhook_url") or settings.webhook_url
    if not url:
        return
    # OpenAI sends video.completed and video.failed; video.cancelled and video.in_progress are ours,
    # sent only to videos whose webhook_events ask for them
    wanted = rec.get("webhook_events") or DEFAULT_EVENT_TYPES
    if event_type not in wanted:
        return
    try:
        enqueue_event(
            connection,
            video=public_video(rec),
            event_type=event_type,
            url=url,
            secret=settings.webhook_secret,
            allow_private=settings.allow_private_webhooks,
        )
    except Exception:  # a webhook problem must never fail the job that triggered it
        log.exception("could not queue webhook %s for %s", event_type, rec.get("id"))
