"""The API with a real worker (a thread running the tiny model on the CPU): a video's whole life,
its content with HTTP Range, the SSE progress stream, cancel and delete while running, webhooks."""

from __future__ import annotations

import http.server
import io
import json
import threading

import av
import pytest
from PIL import Image
from redis import Redis

from server import fleet

from tests.conftest import FAST, wait_for, wait_status

FAST_JSON = dict(FAST, prompt="a paper boat on a river")
SLOW_JSON = dict(FAST_JSON, steps=4)  # with a worker's test_step_delay, each step takes that long


def wait_running(client, video_id: str, stage: str = "denoise") -> dict:
    def running():
        v = client.get(f"/v1/videos/{video_id}").json()
        return v if v["status"] == "in_progress" and v["stage"] == stage else None

    return wait_for(running, 30, what=f"{video_id} to reach {stage}")


def test_video_life_and_content(client, start_worker, settings):
    start_worker()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny-t2v"]
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "tiny-t2v" and model["ready"] is True and model["workers"][0]["device"] == "cpu"

    created = client.post("/v1/videos", json=dict(FAST_JSON, num_frames=5, seed=7)).json()
    video = wait_status(client, created["id"])
    assert video["status"] == "completed", video
    assert (video["progress"], video["attempts"], video["seed"]) == (100, 1, 7)
    assert video["step"] == video["total_steps"] == 1
    assert video["completed_at"] >= video["created_at"]
    assert video["expires_at"] == video["completed_at"] + settings.retention_seconds
    assert {"text_encode", "denoise", "vae_decode", "encode_video", "queue_wait", "total"} <= set(video["timings"])

    mp4 = client.get(f"/v1/videos/{video['id']}/content")
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (96, 128, 3)

    part = client.get(f"/v1/videos/{video['id']}/content", headers={"range": "bytes=4-11"})
    assert part.status_code == 206
    assert part.content == mp4.content[4:12]
    assert part.headers["content-range"] == f"bytes 4-11/{len(mp4.content)}"

    thumb = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    sheet = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"})
    assert thumb.headers["content-type"] == "image/webp" and sheet.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).format == "WEBP"
    assert Image.open(io.BytesIO(sheet.content)).format == "JPEG"

    metrics = client.get("/metrics").text
    assert 'td_videos_finished_total{status="completed"} 1' in metrics
    assert 'td_stage_seconds_count{stage="denoise"} 1' in metrics
    assert "td_workers 1" in metrics


def test_image_to_video_end_to_end(make_client, start_worker):
    client = make_client(models=["tiny-i2v"])
    start_worker("tiny-i2v")
    image = io.BytesIO()
    Image.new("RGB", (160, 90), (20, 120, 220)).save(image, format="JPEG")
    created = client.post("/v1/videos", data={"prompt": "the sea moves", "model": "tiny-i2v", "num_frames": "5",
                                              "steps": "2", "adaptive_resolution": "true"},
                          files={"input_reference": ("sea.jpg", image.getvalue(), "image/jpeg")})
    assert created.status_code == 200, created.text
    video = wait_status(client, created.json()["id"])
    assert video["status"] == "completed", video
    assert video["size"] == "224x128"  # 16:9 image: the 16:9 size kept
    mp4 = client.get(f"/v1/videos/{video['id']}/content").content
    with av.open(io.BytesIO(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_image_size_with_and_without_adaptive_resolution(make_client, start_worker):
    """Issue 5's check through the API: an image with adaptive_resolution gives the size of TurboDiffusion's
    formula at the preset's area; without it, the preset's size (the image is resized). At the tiny preset's
    area a 1000x600 image rounds to the preset's own 224x128, so a portrait image shows the difference too."""
    from turbodiffusion_core.spec import adaptive_size

    client = make_client(models=["tiny-i2v"])
    start_worker("tiny-i2v")
    sizes = {}
    for width, height, adaptive in ((1000, 600, "true"), (600, 1000, "true"), (600, 1000, "false")):
        image = io.BytesIO()
        Image.new("RGB", (width, height), (90, 160, 40)).save(image, format="PNG")
        created = client.post("/v1/videos", data={"prompt": "grass sways", "model": "tiny-i2v", "num_frames": "5",
                                                  "steps": "1", "adaptive_resolution": adaptive},
                              files={"input_reference": ("field.png", image.getvalue(), "image/png")})
        assert created.status_code == 200, created.text
        video = wait_status(client, created.json()["id"])
        assert video["status"] == "completed", video
        mp4 = client.get(f"/v1/videos/{video['id']}/content").content
        with av.open(io.BytesIO(mp4)) as container:
            frame = next(container.decode(video=0))
        assert f"{frame.width}x{frame.height}" == video["size"]
        sizes[width, height, adaptive] = video["size"]
    expect = {(w, h, "true"): "{}x{}".format(*adaptive_size(w, h, 224 * 128)) for w, h in ((1000, 600), (600, 1000))}
    assert sizes == {**expect, (600, 1000, "false"): "224x128"}
    assert sizes[600, 1000, "true"] == "128x224"


def test_events_stream_progress_until_done(client, start_worker):
    start_worker(test_step_delay=0.6)  # each step outlasts a few of the stream's 0.2 s polls
    video = client.post("/v1/videos", json=SLOW_JSON).json()
    with client.stream("GET", f"/v1/videos/{video['id']}/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    videos = [data for name, data in events if name == "video"]
    assert events[-1] == ("done", {"id": video["id"], "status": "completed"})
    assert videos[-1]["status"] == "completed" and videos[-1]["progress"] == 100
    progress = [v["progress"] for v in videos]
    assert progress == sorted(progress)  # never goes backwards
    steps = {v["step"] for v in videos if v["stage"] == "denoise"}
    assert len(steps & {1, 2, 3, 4}) >= 2, videos  # the stream saw the denoising steps go by
    assert videos[0]["status"] in ("queued", "in_progress")  # the stream started before the end


def test_cancel_while_running_then_serve_the_next(client, start_worker, redis_conn):
    start_worker(test_step_delay=0.4)
    video = client.post("/v1/videos", json=SLOW_JSON).json()
    wait_running(client, video["id"])
    resp = client.post(f"/v1/videos/{video['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "in_progress"  # the worker stops at its next step
    final = wait_status(client, video["id"], timeout=30)
    assert (final["status"], final["cancelled"], final["error"]["code"]) == ("failed", True, "cancelled")
    assert final["progress"] < 100
    assert redis_conn.scard("td:active") == 0 and not redis_conn.exists(f"td:lease:{video['id']}")

    after = client.post("/v1/videos", json=FAST_JSON).json()
    assert wait_status(client, after["id"])["status"] == "completed"


def test_delete_while_running(client, start_worker, settings, redis_conn):
    start_worker(test_step_delay=0.4)
    video = client.post("/v1/videos", json=SLOW_JSON).json()
    wait_running(client, video["id"])
    assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
    assert client.get(f"/v1/videos/{video['id']}").status_code == 404
    # the worker notices at its next step, writes nothing back and leaves no files behind
    wait_for(lambda: worker_doc(redis_conn)["busy"] is None, 20, what="the worker to become idle")
    assert not redis_conn.exists(f"td:video:{video['id']}")
    assert not (settings.storage_dir / video["id"]).exists()
    after = client.post("/v1/videos", json=FAST_JSON).json()
    assert wait_status(client, after["id"])["status"] == "completed"


def worker_doc(conn: Redis) -> dict:
    """The one live worker's fleet entry (its `busy` field names the video it is generating)."""
    (doc,) = fleet.live_workers(conn)
    return doc


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.received.append((dict(self.headers), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver.received
    server.shutdown()


def test_webhooks_fire_and_deliveries_show_on_the_video(make_client, start_worker, redis_url, receiver):
    from worker.webhook_worker import run_webhook_worker

    url, received = receiver
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    client = make_client(webhook_secret=secret)
    start_worker(webhook_secret=secret)
    video = client.post("/v1/videos", json=dict(FAST_JSON, webhook_url=url,
                                                 webhook_events=["video.in_progress", "video.completed"])).json()
    wait_status(client, video["id"])
    run_webhook_worker(Redis.from_url(redis_url), burst=True, logging_level="WARNING")
    types = [body["type"] for _, body in received]
    assert types == ["video.in_progress", "video.completed"]
    headers, body = received[-1]
    assert body["data"]["id"] == video["id"]
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= {k.lower() for k in headers}
    deliveries = client.get(f"/v1/videos/{video['id']}").json()["webhook_deliveries"]
    assert len(deliveries) == 2
    assert [(d["type"], d["status_code"]) for d in deliveries] == [("video.in_progress", 204), ("video.completed", 204)]
