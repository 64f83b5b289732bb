"""OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}` for every failure.

The `openai` SDK reads `error.code/param/type/message` and maps the status to its exception
classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError...).
FastAPI's own 422 validation answers are turned into 400s here, so bad input is always a 400 that
names the offending field, never a 422 shape the SDK does not expect and never a 500. While Redis
(the job store) cannot be reached, requests get a 503 `store_unavailable` with Retry-After.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbodiffusion_core.spec import SpecError

log = logging.getLogger("turbodiffusion.server")

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
STORE_RETRY_AFTER_S = 1
"""Retry-After of the 503 answered while Redis cannot be reached."""


class APIError(Exception):
    """Raise from a route to answer with the OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: Optional[str] = None,
    param: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def spec_error(exc: SpecError) -> APIError:
    """A request the model can't serve. Unknown models are 404 model_not_found, like OpenAI."""
    status = 404 if exc.code == "model_not_found" else 400
    return APIError(status, exc.message, code=exc.code, param=exc.param)


def _loc_to_param(loc: tuple[Any, ...]) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc: Exception) -> APIError:
    """First pydantic/FastAPI validation error as a 400 (the message says what was wrong where)."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return APIError(400, str(exc) or "invalid request", code="invalid_value")
    first = errors[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return APIError(400, msg, code=code, param=param)


def install(app: FastAPI) -> None:
    """Register the handlers that turn expected exceptions into the envelope (unexpected ones are
    answered by server.middleware, which can still add x-request-id to them)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
        err = spec_error(exc)
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RedisError)
    async def _store_down(request: Request, exc: RedisError) -> JSONResponse:
        # Redis holds every record and queue: without it nothing can be answered correctly, but nothing is
        # lost either (a create is one MULTI/EXEC), so clients are told to come back (the SDK retries 503s,
        # with an Idempotency-Key on creates, which makes the retry safe).
        log.error("job store (Redis) unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "the job store is unavailable; retry in a moment", "store_unavailable",
                              headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))

