"""Bearer API keys. A key's videos are visible only to that key: the record stores an owner id
derived from the key (a hash, so Redis never holds the keys themselves), and every lookup checks
it, answering 404 (not 403) for other keys' videos so ids can't be probed.

With no keys configured the server is open: every caller is the owner "public" (a warning is
logged at start-up by the app factory).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import APIError

PUBLIC_OWNER = "public"


def owner_of(api_key: str) -> str:
    return "key_" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class KeyRing:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> str:
        """The caller's owner id, or APIError 401."""
        if self.open:
            return PUBLIC_OWNER
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        given = token.strip().encode()
        # compare against every key in constant time, so timing does not reveal a prefix match
        if not any(hmac.compare_digest(given, k) for k in self._keys):
            raise APIError(401, "incorrect API key", code="invalid_api_key")
        return owner_of(given.decode())


async def current_owner(request: Request) -> str:
    """FastAPI dependency: authenticate the request and return its owner id. `async` only so that
    FastAPI runs it on the event loop instead of hopping to its thread pool for a dict lookup."""
    return request.app.state.keys.authenticate(request.headers.get("authorization"))
