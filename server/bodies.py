"""Read the POST /v1/videos body, JSON or form, into VideoCreateParams (+ the uploaded image).

The `openai` SDK always sends multipart, flattening nested values with brackets
(`input_reference[image_url]=...`, `metadata[k]=v`, `webhook_events[]=a`) and stringifying
scalars ("true"/"false", numbers as text, None as ""). This module undoes that so both encodings
validate against the same pydantic model: empty strings mean "not given", bracketed keys become
dicts and lists, and a JSON text is accepted for metadata / webhook_events / input_reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from server.errors import APIError, validation_error
from server.schemas import VideoCreateParams, VideoExtendParams

JSON_FIELDS = ("metadata", "webhook_events", "input_reference", "video")
MAX_FORM_FIELDS = 200
MAX_JSON_OVERHEAD = 1 << 20  # on top of a base64 image


@dataclass
class CreateBody:
    params: VideoCreateParams
    upload: Optional[bytes]  # raw bytes of a multipart `input_reference` file

    def fingerprint(self) -> str:
        return fingerprint(self.params.model_dump(mode="json"), self.upload)


def fingerprint(fields: dict[str, Any], upload: Optional[bytes] = None) -> str:
    """Hash of what a request asked (its fields and any uploaded file), for Idempotency-Key comparison."""
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    if upload is not None:
        h.update(hashlib.sha256(upload).digest())
    return h.hexdigest()


def fold_form(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form pairs -> nested dict: `a[b]=1` -> {"a": {"b": "1"}}, `a[]=x&a[]=y` -> {"a": ["x", "y"]}.
    Empty strings are dropped (the SDK sends None as "")."""
    out: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, str) and value == "":
            continue
        if key.endswith("[]"):
            head = key[:-2]
            prior = out.get(head, [])
            if isinstance(prior, dict):
                raise APIError(400, f"form field {key} conflicts with {head}[...]", code="invalid_value", param=head)
            out[head] = (prior if isinstance(prior, list) else [prior]) + [value]
        elif "[" in key and key.endswith("]"):
            head, _, sub = key[:-1].partition("[")
            bucket = out.setdefault(head, {})
            if not isinstance(bucket, dict):
                raise APIError(400, f"form field {key} conflicts with {head}", code="invalid_value", param=head)
            bucket[sub] = value
        elif key in out:
            prior = out[key]
            out[key] = (prior if isinstance(prior, list) else [prior]) + [value]
        else:
            out[key] = value
    for name in JSON_FIELDS:
        text = out.get(name)
        if isinstance(text, str) and text[:1] in "[{":
            try:
                out[name] = json.loads(text)
            except json.JSONDecodeError:
                raise APIError(400, f"{name}: not valid JSON", code="invalid_value", param=name) from None
    if isinstance(out.get("webhook_events"), str):
        out["webhook_events"] = [e.strip() for e in out["webhook_events"].split(",") if e.strip()]
    return out


def _validate(data: Any) -> VideoCreateParams:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    try:
        return VideoCreateParams.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _limited(request: Request, limit: int) -> Request:
    """The same request, but reading more than `limit` body bytes raises 413, so a chunked upload
    without Content-Length can't fill the disk through the multipart parser's spool files."""
    received = 0
    receive = request.receive

    async def counting_receive():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        return message

    return Request(request.scope, counting_receive)


async def read_create_body(request: Request, max_upload_bytes: int) -> CreateBody:
    data, upload = await read_body(request, max_upload_bytes, file_field="input_reference")
    return CreateBody(_validate(data), upload)


async def read_extend_body(request: Request, max_upload_bytes: int) -> tuple[Any, Optional[bytes]]:
    """POST /v1/videos/extensions: (VideoExtendParams, uploaded video bytes) from JSON or form. The video to
    extend is either `video[id]` (JSON `{"video": {"id": ...}}`) or an MP4 sent as the file field `video`,
    which is how the openai SDK sends it; exactly one of the two."""
    data, upload = await read_body(request, max_upload_bytes, file_field="video")
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    try:
        params = VideoExtendParams.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if (params.video is None) == (upload is None):
        raise APIError(400, "give the video to extend either as video[id] (one of your completed videos) or as "
                            "an uploaded MP4 file `video`, not " + ("both" if upload is not None else "neither"),
                       code="missing_required_parameter" if upload is None else "invalid_value", param="video")
    return params, upload


async def read_body(request: Request, max_upload_bytes: int, *, file_field: str) -> tuple[Any, Optional[bytes]]:
    """The body as a dict (JSON, or a form folded by `fold_form`) and the bytes of its one allowed file part."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = max_upload_bytes * 4 // 3 + MAX_JSON_OVERHEAD  # base64 grows data by 4/3
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
    request = _limited(request, limit)

    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=limit)
        except MultiPartException as exc:
            raise APIError(400, f"malformed form body: {exc.message}", code="invalid_value") from None
        upload: Optional[bytes] = None
        pairs: list[tuple[str, Any]] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != file_field:
                    raise APIError(400, f"unexpected file field {key!r}", code="invalid_value", param=key)
                upload = await value.read(max_upload_bytes + 1)
                if len(upload) > max_upload_bytes:
                    raise APIError(413, f"{file_field} is larger than {max_upload_bytes} bytes",
                                   code="file_too_large", param=file_field)
            else:
                pairs.append((key, value))
        await form.close()
        return fold_form(pairs), upload

    if ctype in ("application/json", ""):
        body = await request.body()
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        return data, None

    raise APIError(415, f"unsupported content-type {ctype!r}: send application/json or multipart/form-data",
                   code="unsupported_media_type")
