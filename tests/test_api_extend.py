"""POST /v1/videos/extensions (OpenAI's extend) with real workers on the tiny models: a completed video is
continued by the image-to-video model from its last frame, and the new video is the whole clip (the original
followed by the new segment); multipart as the SDK sends it, JSON, the SDK itself, and the refusals."""

from __future__ import annotations

import io

import av
import numpy as np
import openai

from tests.conftest import FAST, assert_same_video, uvicorn_in_thread, wait_status
from turbodiffusion_core.spec import seconds_for_frames


def decoded(client, video_id: str) -> np.ndarray:
    mp4 = client.get(f"/v1/videos/{video_id}/content")
    assert mp4.status_code == 200, mp4.text
    with av.open(io.BytesIO(mp4.content)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_extension_is_the_original_followed_by_the_new_segment(make_client, start_worker):
    client = make_client(models=["tiny-t2v", "tiny-i2v"])
    start_worker("tiny-t2v")
    start_worker("tiny-i2v")
    source = client.post("/v1/videos", json=dict(FAST, prompt="a paper boat on a river", num_frames=5, steps=2))
    source = wait_status(client, source.json()["id"])
    assert source["status"] == "completed"

    # multipart, the way the openai SDK sends `video={"id": ...}`
    resp = client.post("/v1/videos/extensions", data={"prompt": "the boat drifts under a bridge",
                                                      "video[id]": source["id"], "num_frames": "5", "steps": "2"})
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["extended_from_video_id"] == source["id"] and created["model"] == "tiny-i2v"
    assert (created["size"], created["num_frames"]) == (source["size"], 5 + 5 - 1)
    video = wait_status(client, created["id"])
    assert video["status"] == "completed", video
    frames, original = decoded(client, video["id"]), decoded(client, source["id"])
    assert frames.shape == (9, *original.shape[1:])
    # the original's decoded frames, encoded once more: a second generation of H.264 loss on the tiny model's
    # noise-like frames (mean |diff| ~3, PSNR ~35 dB; a different video is at mean ~18, ~21 dB)
    assert_same_video(frames[:5], original, "the extension starts with the original", max_mean=6.0)
    thumb = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"

    # JSON works too, and an extension can itself be extended
    body = {"prompt": "night falls", "video": {"id": video["id"]}, "num_frames": 5, "steps": 1, "seed": 3}
    again = client.post("/v1/videos/extensions", json=body, headers={"idempotency-key": "ext-1"})
    assert again.status_code == 200, again.text
    replay = client.post("/v1/videos/extensions", json=body, headers={"idempotency-key": "ext-1"})
    assert replay.json()["id"] == again.json()["id"] and replay.headers.get("idempotent-replayed") == "true"
    longer = wait_status(client, again.json()["id"])
    assert longer["status"] == "completed" and longer["num_frames"] == 13 and longer["seed"] == 3
    assert decoded(client, longer["id"]).shape[0] == 13

    # the official SDK's videos.extend() against a real HTTP server; it uploads the MP4 (its `video={"id": ...}`
    # form is refused by the SDK itself in this version), which works the same way
    mp4 = client.get(f"/v1/videos/{source['id']}/content").content
    with uvicorn_in_thread(client.app) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        ext = sdk.videos.extend(prompt="the river widens", seconds="1", video=("boat.mp4", mp4, "video/mp4"),
                                extra_body={"steps": 1})
        assert ext.status == "queued" and ext.size == source["size"]
        done = sdk.videos.poll(ext.id, poll_interval_ms=100)
        assert done.status == "completed" and done.size == source["size"]
        assert done.seconds == seconds_for_frames(5 + 17 - 1)  # the whole clip: 5 frames + a 17-frame segment
    assert decoded(client, done.id).shape[0] == 21


def test_extension_refusals(make_client, start_worker, monkeypatch):
    client = make_client(models=["tiny-t2v"])
    worker, _ = start_worker("tiny-t2v")
    done = wait_status(client, client.post("/v1/videos", json=dict(FAST, prompt="a kite")).json()["id"])
    assert done["status"] == "completed"

    def extend(**body):
        return client.post("/v1/videos/extensions", json={"prompt": "more", "video": {"id": done["id"]}, **body})

    none_served = extend()
    assert none_served.status_code == 400 and none_served.json()["error"]["param"] == "model"
    assert "image-to-video" in none_served.json()["error"]["message"]
    t2v = extend(model="tiny-t2v")
    assert t2v.status_code == 400 and "text-to-video" in t2v.json()["error"]["message"]
    missing = client.post("/v1/videos/extensions", json={"prompt": "x", "video": {"id": "video_nope"}})
    assert missing.status_code == 404
    for body, param in (({"prompt": "x"}, "video"), ({"prompt": "", "video": {"id": done["id"]}}, "prompt"),
                        ({"prompt": "x", "video": {"id": done["id"]}, "size": "224x128"}, "size")):
        resp = client.post("/v1/videos/extensions", json=body)
        assert resp.status_code == 400 and param in (resp.json()["error"]["param"] or ""), (body, resp.json())
    garbage = client.post("/v1/videos/extensions", data={"prompt": "x"},
                          files={"video": ("clip.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")})
    assert garbage.status_code == 400 and garbage.json()["error"]["param"] == "video"
    assert "cannot be decoded" in garbage.json()["error"]["message"]
    import server.routes.videos as routes

    monkeypatch.setattr(routes, "MAX_EXTEND_BYTES", 128 * 96 * 3 // 2)  # less than one frame of the 128x96 video
    too_long = extend()
    assert too_long.status_code == 400 and "too long" in too_long.json()["error"]["message"]
    monkeypatch.undo()
    both = client.post("/v1/videos/extensions", data={"prompt": "x", "video[id]": done["id"]},
                       files={"video": ("clip.mp4", client.get(f"/v1/videos/{done['id']}/content").content,
                                        "video/mp4")})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]

    worker.stop()  # from here on videos stay queued
    queued = client.post("/v1/videos", json=dict(FAST, prompt="waiting")).json()
    not_done = client.post("/v1/videos/extensions", json={"prompt": "x", "video": {"id": queued["id"]}})
    assert not_done.status_code == 400 and not_done.json()["error"]["param"] == "video"
    assert "completed" in not_done.json()["error"]["message"]
