"""`input_reference` images for image-to-video models: take them from an upload, a data: URL or an
http(s) URL, check they really are JPEG / PNG / WebP within the size limits, and store them
beside the video so the worker can read them.

URLs are fetched through server.netguard, which refuses private and loopback targets (SSRF) unless
TD_ALLOW_PRIVATE_WEBHOOKS allows local addresses.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from server.errors import APIError

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_SIDE = 8192
FETCH_TIMEOUT = 15.0


@dataclass(frozen=True)
class ReferenceImage:
    data: bytes
    extension: str
    width: int
    height: int

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"input.{self.extension}"
        path.write_bytes(self.data)
        return path


def _bad(message: str) -> APIError:
    return APIError(400, message, code="invalid_image", param="input_reference")


def check_image(data: bytes, max_bytes: int) -> ReferenceImage:
    """Decode enough of the image to trust its format and size; refuse anything else."""
    if not data:
        raise _bad("input_reference is empty")
    if len(data) > max_bytes:
        raise APIError(413, f"input_reference is larger than {max_bytes} bytes", code="file_too_large",
                       param="input_reference")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            if fmt not in FORMATS:
                raise _bad(f"input_reference must be JPEG, PNG or WebP; got {fmt or 'unknown'}")
            if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
                raise _bad(f"input_reference is {width}x{height}; each side must be at most {MAX_SIDE}")
            img.load()  # decode fully: truncated or corrupt files fail here, not in the worker
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise _bad(f"input_reference is not a readable JPEG, PNG or WebP image ({exc})") from None
    return ReferenceImage(data=data, extension=FORMATS[fmt], width=width, height=height)


def decode_data_url(url: str) -> bytes:
    """data:image/png;base64,.... -> bytes."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise _bad("data URLs must be base64 encoded: data:image/png;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("input_reference data URL is not valid base64") from None


def fetch_url(url: str, max_bytes: int, allow_private: bool) -> bytes:
    from server.netguard import fetch_limited

    try:
        return fetch_limited(url, max_bytes=max_bytes, timeout=FETCH_TIMEOUT, allow_private=allow_private)
    except ValueError as exc:
        raise _bad(f"input_reference URL refused: {exc}") from None
    except Exception as exc:  # network errors, HTTP errors: the client's URL, not our failure
        raise _bad(f"could not fetch input_reference URL: {exc}") from None


def resolve_reference(
    *, upload: bytes | None, image_url: str | None, file_id: str | None, max_bytes: int, allow_private: bool
) -> ReferenceImage | None:
    """The checked image from whichever form the client used, or None if it sent none."""
    if file_id:
        raise APIError(400, "input_reference.file_id is not supported; upload the image or give image_url",
                       code="unsupported_value", param="input_reference")
    if upload is not None:
        return check_image(upload, max_bytes)
    if not image_url:
        return None
    if image_url.startswith("data:"):
        return check_image(decode_data_url(image_url), max_bytes)
    if image_url.lower().startswith(("http://", "https://")):
        return check_image(fetch_url(image_url, max_bytes, allow_private), max_bytes)
    raise _bad("input_reference image_url must be an http(s) URL or a data: URL")
