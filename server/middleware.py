"""Outermost ASGI middleware: an `x-request-id` on every response, one access-log line per request,
and a last-resort 500 in OpenAI's envelope for anything unexpected.

Written as plain ASGI (not BaseHTTPMiddleware) because it sits on every request, including
streamed SSE and file responses, and must add no measurable latency.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

log = logging.getLogger("turbodiffusion.server.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((b"x-request-id", request_id.encode()))
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id)
            if status["code"]:
                raise  # headers already went out; nothing sensible left to send
            status["code"] = 500
            body = json.dumps(error_body(500, "internal server error", "internal_error")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode()),
                        # a create that failed half-way must not be re-sent blindly by the SDK
                        (b"x-should-retry", b"false"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s -> %d in %.1f ms (%s)", scope["method"], scope["path"], status["code"],
                          (time.perf_counter() - started) * 1000, request_id)
