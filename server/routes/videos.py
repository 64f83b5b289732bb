"""/v1/videos: create, remix, extend, list, retrieve, cancel, delete, download content, follow events.

The hot reads (retrieve, list, events) are `async` and use server.reads on the async Redis client.
Writes go through server.store on the synchronous client (RQ has no async API): cancel, delete
and content are plain `def` routes, which FastAPI runs in its thread pool, and create reads its
body on the event loop, then hands the rest to that pool. Every lookup goes through the caller's
owner id, so another key's video is a 404.

Documented behaviour beyond OpenAI's API:
- Idempotency-Key: a retried create with the same key (per API key) and the same body returns the
  first video (header `idempotent-replayed: true`); the same key with a different body is a 422
  `idempotency_key_reused` (not a 409, which the SDK would retry). Keys live TD_IDEMPOTENCY_TTL s.
- Cancelled videos read `status: "failed"`, `error.code: "cancelled"`, `cancelled: true`.
- A full queue (TD_MAX_QUEUE per model) answers 429 with Retry-After.
- POST /{id}/remix {prompt, ...overrides} (OpenAI's remix): a completed video's resolved request with a new
  prompt and the seed it used; its size (an adaptive I2V size too) and input image carry over.
- POST /extensions {prompt, seconds | num_frames, video[id] or an uploaded MP4 `video`} (OpenAI's extend): an
  image-to-video model continues the video from its last frame at its size; the new video is the whole clip
  (the worker writes the original's frames first), `extended_from_video_id` names the source.
- POST /{id}/feedback {rating: 1-5, note} keeps the caller's rating and note on the video (shown
  as `rating` and `note` on the Video object); a field left out is unchanged, null clears it.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.auth import current_owner
from server.bodies import CreateBody, fingerprint, read_create_body, read_extend_body
from server.errors import APIError, validation_error
from server.events import video_events
from server.images import ReferenceImage, resolve_reference
from server.reads import CursorError
from server.schemas import (EXTEND_OVERRIDES, GENERATION_FIELDS, ImageReference, Video, VideoCreateParams,
                            VideoDeleted, VideoExtendParams, VideoFeedback, VideoList, VideoRemixParams)
from server.settings import Settings
from server.store import Idempotency, Store, StoreError, new_video_id
from server.views import public_status, public_video
from server.webhooks import delivery_log
from turbodiffusion_core import spec
from turbodiffusion_core.video import MEDIA_TYPES, VARIANTS

log = logging.getLogger("turbodiffusion.server")
router = APIRouter(prefix="/v1/videos", tags=["videos"])

DEFAULT_JOB_SECONDS = 10.0


def _store(request: Request) -> Store:
    return request.app.state.store


def _not_found(video_id: str) -> APIError:
    return APIError(404, f"no video with id {video_id!r}", code="video_not_found", param="video_id")


def _owned(request: Request, video_id: str, owner: str) -> dict:
    rec = _store(request).get_owned(video_id, owner)
    if rec is None:
        raise _not_found(video_id)
    return rec


def _view(request: Request, rec: dict, with_deliveries: bool = True) -> dict:
    store = _store(request)
    deliveries = delivery_log(store.r, rec["id"]) if with_deliveries else []
    return public_video(rec, queue_position=store.queue_position(rec), deliveries=deliveries)


def _poll_headers(request: Request, rec: dict) -> dict[str, str]:
    if rec["status"] in spec.TERMINAL_STATUSES:
        return {}
    return {"openai-poll-after-ms": str(request.app.state.settings.poll_after_ms)}


_CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreateParams"}},
        "multipart/form-data": {
            "schema": {
                "allOf": [{"$ref": "#/components/schemas/VideoCreateParams"}],
                "properties": {"input_reference": {"type": "string", "format": "binary"}},
            }
        },
    },
}


@router.post(
    "",
    response_model=Video,
    openapi_extra={"requestBody": _CREATE_BODY},
    summary="Create a video (multipart as the openai SDK sends it, or JSON)",
    responses={400: {"description": "invalid request"}, 404: {"description": "model not found"},
               429: {"description": "queue full (see Retry-After)"}},
)
async def create_video(request: Request, owner: str = Depends(current_owner)):
    settings = request.app.state.settings
    body = await read_create_body(request, settings.max_upload_bytes)
    idem = _idempotency_key(request)
    rec, created, view = await run_in_threadpool(_create, request, owner, body, idem)
    return _respond(request, rec, view, replayed=not created)


def _idempotency_key(request: Request) -> Optional[str]:
    idem = request.headers.get("idempotency-key")
    if idem is not None and not (1 <= len(idem) <= 255):
        raise APIError(400, "Idempotency-Key must be 1 to 255 characters", code="invalid_value",
                       param="Idempotency-Key")
    return idem


def _respond(request: Request, rec: dict, view: dict, replayed: bool = False) -> JSONResponse:
    """The Video object, checked against its schema, with openai-poll-after-ms while unfinished."""
    headers = _poll_headers(request, rec)
    if replayed:
        headers["idempotent-replayed"] = "true"
    return JSONResponse(Video.model_validate(view).model_dump(mode="json"), headers=headers)


def _create(request: Request, owner: str, body: CreateBody, idem: Optional[str]) -> tuple[dict, bool, dict]:
    """Validate against the model, check the queue, store the image, write record + job.
    Returns (record, created, public view)."""
    state = request.app.state
    settings = state.settings
    params: VideoCreateParams = body.params
    model = state.catalog.check(params.model)
    preset = spec.get_preset(model)

    image = _reference_image(params, body, preset, settings)
    fields = {name: getattr(params, name) for name in GENERATION_FIELDS}
    fields["model"] = model
    if image:
        fields.update(image_width=image.width, image_height=image.height)
    try:
        resolved = spec.resolve(spec.GenerationRequest(**fields))
    except ValidationError as exc:
        raise validation_error(exc) from None

    idempotency = Idempotency(idem, body.fingerprint()) if idem else None
    save_image = (lambda folder: image.save(folder).name) if image else None
    return _admit(request, owner, resolved, idempotency, save_image, priority=params.priority,
                  metadata=params.metadata, webhook_url=params.webhook_url, webhook_events=params.webhook_events)


def _admit(
    request: Request,
    owner: str,
    resolved: spec.ResolvedRequest,
    idempotency: Optional[Idempotency],
    save_image: Optional[Callable[[Path], str]],
    **record: Any,
) -> tuple[dict, bool, dict]:
    """The part of create and remix after validation: Idempotency-Key replay, the queue-full check,
    the input image into the new video's folder, then record + job. Returns (record, created, view)."""
    state = request.app.state
    settings, store = state.settings, state.store
    model = resolved.model
    if idempotency:
        try:
            earlier = store.replay(owner, idempotency)
        except StoreError as exc:
            raise APIError(422, exc.message, code=exc.code, param="Idempotency-Key") from None
        if earlier is not None:
            return earlier, False, _view(request, earlier)

    depth = store.queue_depth(model)
    if depth >= settings.max_queue:
        wait = _retry_after(store, depth - settings.max_queue + 1, state.catalog.live().get(model, []))
        raise APIError(429, f"the queue for {model} is full ({depth} videos waiting); retry in {wait} s",
                       code="queue_full", headers={"Retry-After": str(wait)})

    video_id = new_video_id()
    # stored by file name: API and workers may mount the storage folder at different paths
    image_name = save_image(store.video_dir(video_id)) if save_image else None
    try:
        rec, created = store.create(video_id=video_id, owner=owner, resolved=resolved, input_image=image_name,
                                    idempotency=idempotency, **record)
    except StoreError as exc:
        raise APIError(422, exc.message, code=exc.code, param="Idempotency-Key") from None
    finally:
        if image_name and (store.get(video_id) is None):
            store.drop_files(video_id)
    if created:
        log.info("video %s received%s: %s %s %s frames, %d steps, priority %s (queue %d)", video_id,
                 f" (remix of {record['remixed_from']})" if record.get("remixed_from") else "", model,
                 resolved.size, resolved.num_frames, resolved.steps, record.get("priority"), depth + 1)
    # a new video has no webhook deliveries yet: skip that read
    return rec, created, _view(request, rec, with_deliveries=not created)


def _reference_image(
    params: VideoCreateParams, body: CreateBody, preset: spec.Preset, settings: Settings
) -> Optional[ReferenceImage]:
    """The checked input_reference image, required by image-to-video models and refused by the others."""
    ref = params.input_reference
    image_url = ref if isinstance(ref, str) else (ref.image_url if isinstance(ref, ImageReference) else None)
    file_id = ref.file_id if isinstance(ref, ImageReference) else None
    wants_image = body.upload is not None or bool(image_url) or bool(file_id)
    if wants_image and preset.task != "i2v":
        raise APIError(400, f"{preset.id} is a text-to-video model; input_reference is only for image-to-video "
                            "models (GET /v1/models lists each model's task)",
                       code="unsupported_value", param="input_reference")
    if preset.task == "i2v" and not wants_image:
        raise APIError(400, f"{preset.id} is an image-to-video model: send input_reference (JPEG, PNG or WebP)",
                       code="missing_required_parameter", param="input_reference")
    if not wants_image:
        return None
    return resolve_reference(upload=body.upload, image_url=image_url, file_id=file_id,
                             max_bytes=settings.max_upload_bytes, allow_private=settings.allow_private_webhooks)


def _retry_after(store: Store, excess: int, workers: list) -> int:
    """Seconds until roughly `excess` queued videos have drained, from the mean job time so far."""
    counters = store.counters()
    count = counters.get("stage_seconds_count:total", 0.0)
    mean = counters.get("stage_seconds_sum:total", 0.0) / count if count else DEFAULT_JOB_SECONDS
    return max(1, min(120, math.ceil(mean * excess / max(1, len(workers)))))


_EXTEND_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/VideoExtendParams"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/VideoExtendParams"}},
    },
}


@router.post(
    "/extensions",
    response_model=Video,
    openapi_extra={"requestBody": _EXTEND_BODY},
    summary="Extend a completed video with an image-to-video model (OpenAI's extend; the result is the whole video)",
    responses={400: {"description": "invalid request, the video is not completed, or no image-to-video model"},
               404: {"description": "no such video"}, 429: {"description": "queue full (see Retry-After)"}},
)
async def extend_video(request: Request, owner: str = Depends(current_owner)):
    params, upload = await read_extend_body(request, request.app.state.settings.max_upload_bytes)
    idem = _idempotency_key(request)
    rec, created, view = await run_in_threadpool(_extend, request, owner, params, upload, idem)
    return _respond(request, rec, view, replayed=not created)


def _extend(request: Request, owner: str, params: Any, upload: Optional[bytes],
            idem: Optional[str]) -> tuple[dict, bool, dict]:
    """An I2V request from the source video's last frame at its size; the worker prepends the source's frames
    (a copy of its MP4 stored with the new video), so the new video is the whole, longer clip."""
    from PIL import Image

    store = request.app.state.store
    source_id = params.video.id if params.video is not None else None
    if source_id is not None:
        source = _owned(request, source_id, owner)
        if source["status"] != "completed":
            raise APIError(400, f"only a completed video can be extended; {source_id} is "
                                f"{public_status(source['status'])}", code="invalid_value", param="video")
        name = (source.get("files") or {}).get("video")
        path = store.video_dir(source_id) / name if name else None
        if path is None or not path.is_file():
            raise APIError(400, f"the MP4 of {source_id} is no longer stored", code="invalid_value", param="video")
        mp4 = path.read_bytes()
    else:
        mp4 = upload
    last, count = _last_frame(mp4)
    height, width = last.shape[:2]
    preset = _extension_preset(request, params.model, width, height)

    fields = {k: v for k, v in params.model_dump(exclude_none=True).items()
              if k in GENERATION_FIELDS and k in (*EXTEND_OVERRIDES, "prompt", "seconds", "num_frames")}
    fields.update(model=preset.id, size=f"{width}x{height}", image_width=width, image_height=height)
    try:
        resolved = spec.resolve(spec.GenerationRequest(**fields))
    except ValidationError as exc:
        raise validation_error(exc) from None

    def save_inputs(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(last).save(folder / "input.png")
        (folder / "prefix.mp4").write_bytes(mp4)
        return "input.png"

    asked = fingerprint(params.model_dump(mode="json"), upload)
    extends = {"video_id": source_id, "prefix_video": "prefix.mp4", "prefix_frames": count}  # id None: upload
    return _admit(request, owner, resolved, Idempotency(idem, asked) if idem else None, save_inputs,
                  extends=extends, priority=params.priority, metadata=params.metadata,
                  webhook_url=params.webhook_url, webhook_events=params.webhook_events)


MAX_EXTEND_BYTES = 1 << 30
"""Largest video an extension starts from, as decoded RGB frames (the worker holds them while it writes the
result): 1 GiB is about 380 frames (24 s) at 1280x720 or 890 at 832x480."""


def _last_frame(mp4: bytes) -> tuple[np.ndarray, int]:
    """(last frame uint8 [H, W, 3], frame count) of an MP4, decoding one frame at a time; 400 when it is not
    a video we can decode or its frames would exceed MAX_EXTEND_BYTES."""
    import av

    last, count = None, 0
    try:
        with av.open(io.BytesIO(mp4)) as container:
            for frame in container.decode(container.streams.video[0]):
                last = frame.to_ndarray(format="rgb24")
                count += 1
                if count * last.nbytes > MAX_EXTEND_BYTES:
                    raise APIError(400, f"the video to extend is too long: more than {count - 1} frames at "
                                        f"{last.shape[1]}x{last.shape[0]}", code="invalid_value", param="video")
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise APIError(400, f"the video to extend cannot be decoded: {exc}", code="invalid_value",
                       param="video") from None
    if last is None:
        raise APIError(400, "the video to extend has no frames", code="invalid_value", param="video")
    return last, count


def _extension_preset(request: Request, requested: Optional[str], width: int, height: int) -> spec.Preset:
    """The image-to-video preset that continues a width x height video: the one asked for, else a served one
    that makes that size."""
    catalog = request.app.state.catalog
    if requested is not None:
        preset = spec.get_preset(catalog.check(requested))
        if preset.task != "i2v":
            raise APIError(400, f"{preset.id} is a text-to-video model; extending a video needs an image-to-video "
                                "model (GET /v1/models lists each model's task)", code="unsupported_value",
                           param="model")
        candidates = [preset]
    else:
        candidates = [p for p in map(spec.get_preset, catalog.models()) if p.task == "i2v"]
        if not candidates:
            raise APIError(400, "extending a video continues it from its last frame with an image-to-video model, "
                                "and none is served here (GET /v1/models)", code="unsupported_value", param="model")
    for preset in candidates:
        if (width, height) in preset.sizes():
            return preset
    sizes = ", ".join(spec.format_size(w, h) for w, h in candidates[0].sizes())
    raise APIError(400, f"the video is {width}x{height}, which {candidates[0].id} cannot continue; it makes {sizes}",
                   code="unsupported_value", param="video")


@router.get("", response_model=VideoList, summary="List your videos (cursor pagination)")
async def list_videos(
    request: Request,
    owner: str = Depends(current_owner),
    after: Optional[str] = Query(None, max_length=64, description="id of the last video of the previous page"),
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = Query("desc", description="by creation time"),
):
    try:
        recs, has_more = await request.app.state.reads.page(owner, after=after, limit=limit, order=order)
    except CursorError as exc:
        raise APIError(400, str(exc), code="invalid_cursor", param="after") from None
    data = [public_video(r) for r in recs]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.get("/{video_id}", response_model=Video, summary="Retrieve a video (sends openai-poll-after-ms)")
async def retrieve_video(request: Request, video_id: str, owner: str = Depends(current_owner)):
    reads = request.app.state.reads
    found = await reads.get_owned(video_id, owner)
    if found is None:
        raise _not_found(video_id)
    rec, deliveries = found
    view = public_video(rec, queue_position=await reads.queue_position(rec), deliveries=deliveries)
    return _respond(request, rec, view)


@router.delete("/{video_id}", response_model=VideoDeleted, summary="Delete a video (cancels it if unfinished)")
def delete_video(request: Request, video_id: str, owner: str = Depends(current_owner)):
    _owned(request, video_id, owner)
    _store(request).delete(video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@router.post("/{video_id}/cancel", response_model=Video,
             summary="Cancel a queued or running video (extension; ends as failed + cancelled)")
def cancel_video(request: Request, video_id: str, owner: str = Depends(current_owner)):
    _owned(request, video_id, owner)
    try:
        rec = _store(request).cancel(video_id)
    except StoreError as exc:
        status = 404 if exc.code == "not_found" else 409
        raise APIError(status, exc.message, code=exc.code, param="video_id") from None
    return _respond(request, rec, _view(request, rec))


@router.post("/{video_id}/feedback", response_model=Video,
             summary="Rate a video 1-5 and keep a note on it (extension; left-out fields unchanged, null clears)")
def video_feedback(request: Request, video_id: str, feedback: VideoFeedback, owner: str = Depends(current_owner)):
    _owned(request, video_id, owner)
    fields = {name: getattr(feedback, name) for name in feedback.model_fields_set}
    if not fields:
        raise APIError(400, "send rating (1-5) and/or note", code="missing_required_parameter", param="rating")
    rec = _store(request).set_feedback(video_id, **fields)
    if rec is None:
        raise _not_found(video_id)
    return _respond(request, rec, _view(request, rec))


@router.post(
    "/{video_id}/remix",
    response_model=Video,
    summary="Remix a completed video: a new prompt with the same model, size, length, settings and seed",
    responses={400: {"description": "invalid request, or the video is not completed"},
               404: {"description": "no such video"}, 429: {"description": "queue full (see Retry-After)"}},
)
def remix_video(request: Request, video_id: str, params: VideoRemixParams, owner: str = Depends(current_owner)):
    idem = _idempotency_key(request)
    rec, created, view = _remix(request, owner, video_id, params, idem)
    return _respond(request, rec, view, replayed=not created)


def _remix(request: Request, owner: str, source_id: str, params: Any,
           idem: Optional[str]) -> tuple[dict, bool, dict]:
    """A new video from a completed one: its resolved request with the new prompt, the seed it actually
    used, the overrides given, its size kept as it was (an adaptive I2V size included), and a copy of its
    input image. Recorded with `remixed_from`."""
    store = request.app.state.store
    source = _owned(request, source_id, owner)
    if source["status"] != "completed":
        raise APIError(400, f"only a completed video can be remixed; {source_id} is {public_status(source['status'])}",
                       code="invalid_value", param="video_id")
    model = request.app.state.catalog.check(source["model"])
    before = spec.ResolvedRequest(**source["resolved"])
    given = params.model_dump(exclude_none=True)
    fields: dict[str, Any] = {
        "prompt": params.prompt, "model": model, "seed": source.get("seed_used") or before.seed,
        "num_frames": before.num_frames, "steps": before.steps, "sigma_max": before.sigma_max,
        "attention_type": before.attention_type, "sla_topk": before.sla_topk, "quant": before.quant,
        "ode": before.ode, "negative_prompt": before.negative_prompt, "guidance_scale": before.guidance_scale,
        "shift": before.shift,
    }
    if before.task == "i2v":
        fields["boundary"] = before.boundary
    fields.update({name: value for name, value in given.items() if name in GENERATION_FIELDS})
    try:
        resolved = spec.resolve(spec.GenerationRequest(**fields))
    except ValidationError as exc:
        raise validation_error(exc) from None
    resolved = resolved.model_copy(update={"width": before.width, "height": before.height})

    save_image = None
    if source.get("input_image"):
        image = store.video_dir(source_id) / source["input_image"]
        if not image.is_file():
            raise APIError(400, f"the input image of {source_id} is no longer stored; create a new video instead",
                           code="invalid_value", param="video_id")

        def save_image(folder: Path) -> str:
            folder.mkdir(parents=True, exist_ok=True)
            return shutil.copy2(image, folder / image.name).name

    asked = fingerprint({"remix_of": source_id, **params.model_dump(mode="json")})
    idempotency = Idempotency(idem, asked) if idem else None
    record = {name: given.get(name, source.get(name)) for name in ("priority", "metadata", "webhook_url",
                                                                     "webhook_events")}
    return _admit(request, owner, resolved, idempotency, save_image, remixed_from=source_id, **record)


@router.get(
    "/{video_id}/content",
    summary="Download the MP4, its thumbnail (WebP) or spritesheet (JPEG); Range supported",
    response_class=FileResponse,
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}},
)
def download_content(
    request: Request,
    video_id: str,
    owner: str = Depends(current_owner),
    variant: Literal[VARIANTS] = Query("video"),
):
    rec = _owned(request, video_id, owner)
    if rec["status"] != "completed":
        raise APIError(404, f"video {video_id} has no content: it is {rec['status']}", code="content_not_ready",
                       param="video_id")
    name = (rec.get("files") or {}).get(variant)
    path = _store(request).video_dir(video_id) / name if name else None
    if path is None or not path.is_file():
        raise APIError(404, f"the {variant} of video {video_id} is no longer stored", code="content_expired")
    return FileResponse(path, media_type=MEDIA_TYPES[variant], filename=f"{video_id}{path.suffix}",
                        content_disposition_type="inline")


@router.get("/{video_id}/events", summary="Server-sent events: the video object each time it changes",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def follow_events(request: Request, video_id: str, owner: str = Depends(current_owner)):
    state = request.app.state
    if await state.reads.get_owned(video_id, owner) is None:
        raise _not_found(video_id)
    stream = video_events(state.reads, video_id, owner, max_seconds=state.settings.job_timeout + 600)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
