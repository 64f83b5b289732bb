"""API behaviour that needs no worker: validation, errors, auth, idempotency, limits, listing,
cancel/delete of queued videos, metrics. TD_MODELS makes the tiny models acceptable without a
live worker, so these requests stay queued."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from PIL import Image

from tests.conftest import FAST, REPO

FAST_JSON = dict(FAST, prompt="a red fox in the snow")


def multipart(fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body made of text fields only, the way the openai SDK sends a create."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_bytes(size=(64, 48), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def api(make_client):
    return make_client(models=["tiny-t2v", "tiny-i2v"])


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param
    assert resp.headers.get("x-request-id")
    return err


# --- validation -----------------------------------------------------------------------------
def test_bad_size_is_400_listing_supported_sizes(api):
    err = assert_error(api.post("/v1/videos", json=dict(FAST_JSON, size="832x480")), 400, "unsupported_value", "size")
    for size in ("128x128", "128x96", "224x128"):
        assert size in err["message"]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"num_frames": 18}, "num_frames"),  # not 4k+1
        ({"num_frames": 85}, "num_frames"),  # over the model's maximum
        ({"num_frames": None, "seconds": 100}, "seconds"),  # over 60 s
        ({"steps": 9}, "steps"),  # rCM models take 1-4
        ({"attention_type": "flash"}, "attention_type"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),  # not for rCM models
        ({"priority": "urgent"}, "priority"),
        ({"seed": -1}, "seed"),
        ({"webhook_events": ["video.exploded"]}, "webhook_events.0"),
        ({"bogus": 1}, "bogus"),  # unknown fields are refused, as OpenAI does
    ],
)
def test_invalid_values_are_400_naming_the_param(api, change, param):
    body = {k: v for k, v in dict(FAST_JSON, **change).items() if v is not None}
    assert_error(api.post("/v1/videos", json=body), 400, param=param)


def test_seconds_maps_to_frames(api):
    resp = api.post("/v1/videos", json={"prompt": "x", "model": "tiny-t2v", "seconds": "2", "size": "128x96"})
    assert resp.status_code == 200, resp.text
    video = resp.json()
    assert video["num_frames"] == 33 and video["seconds"] == "2"


def test_unknown_and_unserved_models_are_404_model_not_found(api):
    err = assert_error(api.post("/v1/videos", json=dict(FAST_JSON, model="sora-2")), 404, "model_not_found", "model")
    assert "tiny-t2v" in err["message"]
    err = assert_error(api.post("/v1/videos", json=dict(FAST_JSON, model="wan2.1-t2v-1.3b")), 404, "model_not_found")
    assert "served now: tiny-t2v, tiny-i2v" in err["message"]


def test_malformed_bodies_are_400_or_415_never_422_or_500(api):
    assert_error(api.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")
    assert_error(api.post("/v1/videos", json=[1, 2]), 400)
    assert_error(api.post("/v1/videos", json={"model": "tiny-t2v"}), 400, "missing_required_parameter", "prompt")
    assert_error(api.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"}), 415)
    assert_error(api.get("/v1/videos?limit=0"), 400, param="limit")
    assert_error(api.get("/v1/videos?order=sideways"), 400, param="order")
    assert_error(api.get("/v1/nothing"), 404, "not_found")


@pytest.mark.parametrize("pairs", [
    [("metadata", "a"), ("metadata[]", "b")],  # a plain field, then the same name as a list
    [("webhook_events", "video.completed"), ("webhook_events[]", "video.failed")],
    [("metadata[k]", "v"), ("metadata[]", "b")],  # a dict, then the same name as a list
])
def test_conflicting_form_shapes_are_400_not_500(api, pairs):
    """Regression: `name=x` followed by `name[]=y` in one multipart body raised inside the form folding."""
    body, ctype = multipart([("prompt", "p"), ("model", "tiny-t2v"), *pairs])
    resp = api.post("/v1/videos", content=body, headers={"content-type": ctype})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]["message"]


def test_multipart_as_the_sdk_sends_it(api):
    """Strings everywhere, "" for None, booleans as "true", bracketed dicts and lists."""
    body, ctype = multipart([
        ("prompt", "a lighthouse at dusk"), ("model", "tiny-t2v"), ("seconds", ""), ("size", "128x96"),
        ("num_frames", "5"), ("steps", "2"), ("seed", "42"), ("ode", "true"), ("priority", "high"),
        ("metadata[user]", "u1"), ("metadata[run]", "7"),
        ("webhook_events[]", "video.completed"), ("webhook_events[]", "video.cancelled"),
    ])
    resp = api.post("/v1/videos", content=body, headers={"content-type": ctype})
    assert resp.status_code == 200, resp.text
    video = resp.json()
    assert video["id"].startswith("video_") and video["object"] == "video"
    assert (video["status"], video["progress"], video["queue_position"]) == ("queued", 0, 0)
    assert (video["num_frames"], video["steps"], video["seed"], video["priority"]) == (5, 2, 42, "high")
    assert video["seconds"] == "0.25" and video["size"] == "128x96"
    assert video["metadata"] == {"user": "u1", "run": "7"}
    assert resp.headers["openai-poll-after-ms"] == "100"
    again = api.get(f"/v1/videos/{video['id']}")
    assert again.status_code == 200 and again.json()["metadata"] == {"user": "u1", "run": "7"}


def test_request_id_is_echoed_or_made(api):
    assert api.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert api.get("/healthz").headers["x-request-id"].startswith("req_")


# --- input_reference ---------------------------------------------------------------------------
def test_input_reference_is_refused_for_text_to_video(api):
    resp = api.post("/v1/videos", data={"prompt": "x", "model": "tiny-t2v"},
                    files={"input_reference": ("a.png", png_bytes(), "image/png")})
    assert_error(resp, 400, "unsupported_value", "input_reference")


def test_image_to_video_needs_and_stores_a_real_image(api, settings):
    assert_error(api.post("/v1/videos", json={"prompt": "x", "model": "tiny-i2v"}), 400,
                 "missing_required_parameter", "input_reference")
    bad = api.post("/v1/videos", data={"prompt": "x", "model": "tiny-i2v"},
                   files={"input_reference": ("a.png", b"GIF89a not really", "image/png")})
    assert_error(bad, 400, "invalid_image", "input_reference")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert_error(api.post("/v1/videos", data={"prompt": "x", "model": "tiny-i2v"},
                          files={"input_reference": ("a.gif", gif.getvalue(), "image/gif")}), 400, "invalid_image")

    upload = api.post("/v1/videos", data={"prompt": "x", "model": "tiny-i2v", "size": "128x96"},
                      files={"input_reference": ("a.png", png_bytes(), "image/png")})
    assert upload.status_code == 200, upload.text
    stored = settings.storage_dir / upload.json()["id"] / "input.png"
    assert stored.read_bytes() == png_bytes()

    data_url = "data:image/webp;base64," + base64.b64encode(png_bytes((96, 96), "WEBP")).decode()
    via_url = api.post("/v1/videos", json={"prompt": "x", "model": "tiny-i2v", "adaptive_resolution": True,
                                           "input_reference": {"image_url": data_url}})
    assert via_url.status_code == 200, via_url.text
    assert via_url.json()["size"] == "176x176"  # square image -> square output, area of 224x128
    assert (settings.storage_dir / via_url.json()["id"] / "input.webp").exists()


@pytest.fixture
def image_host():
    """A local HTTP server answering every GET with a PNG (a private address, on purpose)."""
    body = png_bytes((32, 32))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/first-frame.png"
    server.shutdown()


def test_image_url_is_fetched_unless_private(make_client, image_host, settings):
    allowed = make_client(models=["tiny-i2v"], allow_private_webhooks=True)
    resp = allowed.post("/v1/videos", json={"prompt": "x", "model": "tiny-i2v",
                                            "input_reference": {"image_url": image_host}})
    assert resp.status_code == 200, resp.text
    assert (settings.storage_dir / resp.json()["id"] / "input.png").read_bytes() == png_bytes((32, 32))

    guarded = make_client(models=["tiny-i2v"], allow_private_webhooks=False)
    err = assert_error(guarded.post("/v1/videos", json={"prompt": "x", "model": "tiny-i2v",
                                                         "input_reference": image_host}), 400, "invalid_image")
    assert "refused" in err["message"]


def test_chunked_body_over_the_limit_is_413(make_client):
    api = make_client(models=["tiny-t2v"], max_upload_bytes=2048)

    def chunks():  # no Content-Length: the server has to count
        yield b'{"prompt": "'
        for _ in range(40):  # 2.5 MB: over max_upload_bytes*4/3 + 1 MiB of JSON allowance
            yield b"x" * 65536
        yield b'"}'

    resp = api.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "request_too_large")


def test_oversized_upload_is_413(make_client):
    api = make_client(models=["tiny-i2v"], max_upload_bytes=2048)
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, format="PNG")  # noise: incompressible
    big = buf.getvalue()
    assert len(big) > 2048
    resp = api.post("/v1/videos", data={"prompt": "x", "model": "tiny-i2v"},
                    files={"input_reference": ("a.png", big, "image/png")})
    assert_error(resp, 413, "file_too_large")


# --- auth, idempotency, limits ---------------------------------------------------------------
def test_api_keys_isolate_videos(make_client):
    api = make_client(models=["tiny-t2v"], api_keys=["key-a", "key-b"])
    assert_error(api.get("/v1/videos"), 401, "invalid_api_key")
    assert_error(api.get("/v1/videos", headers={"authorization": "Bearer wrong"}), 401, "invalid_api_key")
    a, b = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    video = api.post("/v1/videos", json=FAST_JSON, headers=a).json()
    assert api.get(f"/v1/videos/{video['id']}", headers=a).status_code == 200
    assert_error(api.get(f"/v1/videos/{video['id']}", headers=b), 404, "video_not_found")
    assert_error(api.delete(f"/v1/videos/{video['id']}", headers=b), 404)
    assert_error(api.post(f"/v1/videos/{video['id']}/cancel", headers=b), 404)
    assert api.get("/v1/videos", headers=b).json()["data"] == []
    assert [v["id"] for v in api.get("/v1/videos", headers=a).json()["data"]] == [video["id"]]
    assert api.get("/healthz").status_code == 200  # health stays open


def test_idempotency_key_replays_the_same_video(api):
    first = api.post("/v1/videos", json=FAST_JSON, headers={"idempotency-key": "k1"})
    again = api.post("/v1/videos", json=FAST_JSON, headers={"idempotency-key": "k1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(api.get("/v1/videos").json()["data"]) == 1
    changed = api.post("/v1/videos", json=dict(FAST_JSON, seed=5), headers={"idempotency-key": "k1"})
    assert_error(changed, 422, "idempotency_key_reused")
    other = api.post("/v1/videos", json=FAST_JSON, headers={"idempotency-key": "k2"})
    assert other.json()["id"] != first.json()["id"]


def test_full_queue_is_429_with_retry_after(make_client):
    api = make_client(models=["tiny-t2v"], max_queue=2)
    for _ in range(2):
        assert api.post("/v1/videos", json=FAST_JSON).status_code == 200
    resp = api.post("/v1/videos", json=FAST_JSON)
    assert_error(resp, 429, "queue_full")
    assert 1 <= int(resp.headers["retry-after"]) <= 120
    assert resp.json()["error"]["type"] == "rate_limit_error"


def test_idempotent_retry_gets_its_video_even_when_the_queue_is_full(make_client):
    """Regression: the queue check ran before the Idempotency-Key lookup, so the SDK's retry of an accepted
    create was refused with 429 once the queue had filled up."""
    api = make_client(models=["tiny-t2v"], max_queue=1)
    first = api.post("/v1/videos", json=FAST_JSON, headers={"idempotency-key": "retry-me"})
    assert first.status_code == 200
    assert_error(api.post("/v1/videos", json=FAST_JSON), 429, "queue_full")
    again = api.post("/v1/videos", json=FAST_JSON, headers={"idempotency-key": "retry-me"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"


# --- listing, priorities, cancel, delete -------------------------------------------------------
def test_list_pagination_both_orders(api):
    ids = [api.post("/v1/videos", json=FAST_JSON).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        page = api.get("/v1/videos", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [v["id"] for v in page["data"]]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    asc = api.get("/v1/videos", params={"order": "asc", "limit": 100}).json()
    assert [v["id"] for v in asc["data"]] == ids and asc["has_more"] is False
    assert_error(api.get("/v1/videos", params={"after": "video_" + "0" * 32}), 400, "invalid_cursor", "after")


def test_high_priority_goes_first(api):
    normal = api.post("/v1/videos", json=FAST_JSON).json()
    high = api.post("/v1/videos", json=dict(FAST_JSON, priority="high")).json()
    assert high["queue_position"] == 0
    assert api.get(f"/v1/videos/{normal['id']}").json()["queue_position"] == 1


def test_cancel_queued_video(api, redis_conn):
    video = api.post("/v1/videos", json=FAST_JSON).json()
    job_key = f"rq:job:{video['id']}-a1"
    assert redis_conn.exists(job_key)
    resp = api.post(f"/v1/videos/{video['id']}/cancel")
    assert not redis_conn.exists(job_key)  # regression: the RQ job hash outlived its pulled ticket forever
    assert resp.status_code == 200
    body = resp.json()
    assert (body["status"], body["cancelled"], body["error"]["code"]) == ("failed", True, "cancelled")
    assert "openai-poll-after-ms" not in resp.headers  # terminal: pollers stop
    assert "td_queue_depth{model=\"tiny-t2v\",priority=\"normal\"} 0" in api.get("/metrics").text
    assert_error(api.post(f"/v1/videos/{video['id']}/cancel"), 409, "video_finished")


def test_delete_queued_video(api, settings):
    video = api.post("/v1/videos", json=FAST_JSON).json()
    resp = api.delete(f"/v1/videos/{video['id']}")
    assert resp.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert_error(api.get(f"/v1/videos/{video['id']}"), 404)
    assert_error(api.delete(f"/v1/videos/{video['id']}"), 404)
    assert api.get("/v1/videos").json()["data"] == []
    assert not (settings.storage_dir / video["id"]).exists()


def test_content_of_unfinished_video_is_404(api):
    video = api.post("/v1/videos", json=FAST_JSON).json()
    assert_error(api.get(f"/v1/videos/{video['id']}/content"), 404, "content_not_ready")
    assert_error(api.get(f"/v1/videos/{video['id']}/content?variant=gif"), 400, param="variant")


# --- ops endpoints -----------------------------------------------------------------------------
def test_health_models_and_metrics_without_workers(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["workers"] == 0
    models = api.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-t2v", "tiny-i2v"]
    assert models["data"][0]["ready"] is False and "128x96" in models["data"][0]["sizes"]

    api.post("/v1/videos", json=FAST_JSON)
    text = api.get("/metrics").text
    assert 'td_queue_depth{model="tiny-t2v",priority="normal"} 1' in text
    assert 'td_videos{state="queued"} 1' in text
    assert "td_videos_created_total 1" in text
    assert "# TYPE td_stage_seconds summary" in text


def test_openapi_documents_the_create_body(api):
    schema = api.get("/openapi.json").json()
    body = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    props = schema["components"]["schemas"]["VideoCreateParams"]["properties"]
    assert {"prompt", "model", "seconds", "size", "input_reference", "webhook_url", "metadata"} <= set(props)


def test_api_process_never_imports_torch(settings):
    code = (
        "import sys, json; from server.app import create_app; from server.settings import Settings; "
        f"app = create_app(Settings(**json.loads({json.dumps(settings.model_dump(mode='json'))!r}))); "
        "app.openapi(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(30)  # before the fix the stream waited forever for a change it never reported
def test_events_stream_reports_a_queued_videos_position_as_it_moves(api):
    """Regression: the stream only watched status/stage/step/progress, so a queued video's position stayed
    where it was when the video ahead of it left the queue."""
    ahead = api.post("/v1/videos", json=FAST_JSON).json()
    mine = api.post("/v1/videos", json=FAST_JSON).json()
    positions = []
    with api.stream("GET", f"/v1/videos/{mine['id']}/events") as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[len("data: "):])
            if data.get("object") != "video":
                break
            positions.append(data["queue_position"])
            if len(positions) == 1:
                assert api.post(f"/v1/videos/{ahead['id']}/cancel").status_code == 200
            elif data["queue_position"] == 0:
                assert api.post(f"/v1/videos/{mine['id']}/cancel").status_code == 200
    assert positions[:2] == [1, 0], positions
