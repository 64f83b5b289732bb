"""The web UI: a static page at `/` (server/static/) that drives the public API from the browser.

No build step and no private endpoints: the page calls /v1/models, /v1/videos (create, list,
retrieve, events, cancel, content, feedback) with the API key the user typed, kept in the
browser's localStorage. These routes need no key (the page holds no data) and stay out of the
OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from server.errors import APIError

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# The page is small and changes with the server version: let browsers revalidate (ETag) every load.
NO_STALE = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=NO_STALE)


@router.get("/ui")
def ui_redirect():
    return RedirectResponse("/", status_code=308)


@router.get("/ui/{name}")
def asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no UI file {name!r}", code="not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_STALE)
