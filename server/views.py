"""The public Video object: how a stored record looks to API clients and webhook receivers.

OpenAI's Video has four statuses (queued, in_progress, completed, failed) and the `openai` SDK's
poll loop stops on completed or failed. A cancelled video is therefore shown as
`status: "failed"` with `error.code == "cancelled"` and our own `cancelled: true`, so SDK pollers
terminate and strict clients still parse it. Everything after `remixed_from_video_id` below is
our documented extension. Imports neither FastAPI nor torch (workers render it for webhooks).
"""

from __future__ import annotations

from typing import Any, Optional

from turbodiffusion_core.spec import seconds_for_frames


def public_status(status: str) -> str:
    return "failed" if status == "cancelled" else status


def public_video(
    rec: dict[str, Any],
    *,
    queue_position: Optional[int] = None,
    deliveries: Optional[list[dict]] = None,
) -> dict[str, Any]:
    """Render a record (server.store layout) as the API's Video object."""
    resolved = rec.get("resolved") or {}
    status = rec["status"]
    error = rec.get("error")
    if status == "cancelled" and not error:
        error = {"code": "cancelled", "message": "the video was cancelled before it finished"}
    width, height = resolved.get("width"), resolved.get("height")
    num_frames = resolved.get("num_frames")
    if num_frames and rec.get("prefix_frames"):  # an extension is the whole video: the original + the new part
        num_frames += int(rec["prefix_frames"]) - 1
    return {
        "id": rec["id"],
        "object": "video",
        "status": public_status(status),
        "progress": int(rec.get("progress") or 0),
        "created_at": int(rec["created_at"]),
        "completed_at": rec.get("completed_at"),
        "expires_at": rec.get("expires_at"),
        "model": rec["model"],
        "prompt": resolved.get("prompt"),
        "seconds": seconds_for_frames(num_frames) if num_frames else None,
        "size": f"{width}x{height}" if width and height else None,
        "error": error,
        "remixed_from_video_id": rec.get("remixed_from"),
        "extended_from_video_id": rec.get("extended_from"),
        # --- extensions ---
        "cancelled": status == "cancelled",
        "queue_position": queue_position if status == "queued" else None,
        "stage": rec.get("stage"),
        "step": rec.get("step"),
        "total_steps": rec.get("total_steps") or resolved.get("steps"),
        "seed": rec.get("seed_used") or resolved.get("seed"),
        "num_frames": num_frames,
        "steps": resolved.get("steps"),
        "attention_type": resolved.get("attention_type"),
        "sla_topk": resolved.get("sla_topk"),
        "ode": resolved.get("ode"),
        "boundary": resolved.get("boundary") if resolved.get("task") == "i2v" else None,
        "quant": resolved.get("quant"),
        "priority": rec.get("priority"),
        "attempts": int(rec.get("runs") or 0),
        "timings": rec.get("timings") or {},
        "metadata": rec.get("metadata") or {},
        "rating": rec.get("rating"),
        "note": rec.get("note"),
        "webhook_deliveries": deliveries or [],
    }
