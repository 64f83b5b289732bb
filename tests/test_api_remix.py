"""POST /v1/videos/{id}/remix (OpenAI's remix, JSON {prompt}) with a real worker running the tiny models:
a remix keeps the source's model, size, length, settings and seed, so the same prompt gives back the same
video; overrides, refusals, per-key isolation, Idempotency-Key, the I2V input image, and the openai SDK."""

from __future__ import annotations

import io

import av
import numpy as np
import openai
from PIL import Image

from tests.conftest import FAST, assert_same_video, uvicorn_in_thread, wait_status

A, B = "sk-remix-a", "sk-remix-b"


def frames_of(client, video_id: str, headers: dict) -> np.ndarray:
    mp4 = client.get(f"/v1/videos/{video_id}/content", headers=headers)
    assert mp4.status_code == 200, mp4.text
    with av.open(io.BytesIO(mp4.content)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_remix_keeps_everything_but_the_prompt(make_client, start_worker):
    client = make_client(api_keys=[A, B], models=["tiny-t2v"])
    auth = {"authorization": f"Bearer {A}"}
    start_worker()
    source = client.post("/v1/videos", headers=auth,
                         json=dict(FAST, prompt="a red kite over green hills", num_frames=5, steps=2)).json()
    source = wait_status(client, source["id"], headers=auth)
    assert source["status"] == "completed" and source["seed"] > 0  # seed 0 asked: a random one was drawn

    resp = client.post(f"/v1/videos/{source['id']}/remix", headers=auth, json={"prompt": "a blue kite at night"})
    assert resp.status_code == 200, resp.text
    remix = resp.json()
    assert remix["remixed_from_video_id"] == source["id"] and remix["id"] != source["id"]
    assert remix["prompt"] == "a blue kite at night" and remix["status"] == "queued"
    kept = ("model", "size", "seconds", "num_frames", "steps", "seed", "attention_type", "ode", "priority")
    assert {k: remix[k] for k in kept} == {k: source[k] for k in kept}
    remix = wait_status(client, remix["id"], headers=auth)
    assert remix["status"] == "completed" and remix["remixed_from_video_id"] == source["id"]

    # the same prompt again through remix: every setting and the seed carried over -> the same video
    again = client.post(f"/v1/videos/{source['id']}/remix", headers=auth,
                        json={"prompt": "a red kite over green hills"}).json()
    again = wait_status(client, again["id"], headers=auth)
    original = frames_of(client, source["id"], auth)
    same, new = frames_of(client, again["id"], auth), frames_of(client, remix["id"], auth)
    assert_same_video(same, original, "remix with the source's own prompt")
    assert np.abs(new.astype(int) - original).mean() > np.abs(same.astype(int) - original).mean() + 1.0

    # overrides change just what they name
    resp = client.post(f"/v1/videos/{source['id']}/remix", headers=auth,
                       json={"prompt": "a kite", "steps": 1, "seed": 5, "metadata": {"take": "3"}})
    assert resp.status_code == 200, resp.text
    changed = resp.json()
    assert (changed["steps"], changed["seed"], changed["metadata"]) == (1, 5, {"take": "3"})
    assert (changed["size"], changed["num_frames"]) == (source["size"], source["num_frames"])

    # another key's video does not exist for this key
    other = client.post(f"/v1/videos/{source['id']}/remix", headers={"authorization": f"Bearer {B}"},
                        json={"prompt": "mine now"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "video_not_found"


def test_remix_refusals_and_idempotency(make_client):
    client = make_client(models=["tiny-t2v"])  # no worker: videos stay queued
    queued = client.post("/v1/videos", json=dict(FAST, prompt="a boat")).json()

    not_done = client.post(f"/v1/videos/{queued['id']}/remix", json={"prompt": "a ship"})
    assert not_done.status_code == 400
    assert not_done.json()["error"]["param"] == "video_id" and "completed" in not_done.json()["error"]["message"]

    missing = client.post("/v1/videos/video_doesnotexist/remix", json={"prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"

    for body, param in (({"prompt": "x", "size": "224x128"}, "size"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "x", "steps": 0}, "steps"), ({}, "prompt")):
        resp = client.post(f"/v1/videos/{queued['id']}/remix", json=body)
        assert resp.status_code == 400, (body, resp.text)
        assert param in (resp.json()["error"]["param"] or ""), (body, resp.json())


def test_remix_idempotency_key_and_sdk(make_client, start_worker):
    client = make_client(models=["tiny-t2v"])
    start_worker()
    source = wait_status(client, client.post("/v1/videos", json=dict(FAST, prompt="waves", seed=11)).json()["id"])
    assert source["status"] == "completed"
    headers = {"idempotency-key": "remix-once"}
    first = client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "storm"}, headers=headers)
    second = client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "storm"}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"] and second.headers.get("idempotent-replayed") == "true"
    reused = client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "calm"}, headers=headers)
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"

    # the official SDK's videos.remix() (JSON body) against a real HTTP server
    with uvicorn_in_thread(client.app) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        remixed = sdk.videos.remix(source["id"], prompt="waves at dawn")
        assert remixed.remixed_from_video_id == source["id"] and remixed.prompt == "waves at dawn"
        done = sdk.videos.poll(remixed.id, poll_interval_ms=100)
        assert done.status == "completed" and done.size == source["size"]


def test_image_to_video_remix_reuses_the_input_image_and_its_size(make_client, start_worker, settings):
    client = make_client(models=["tiny-i2v"])
    start_worker("tiny-i2v")
    image = io.BytesIO()
    Image.new("RGB", (1000, 600), (200, 80, 20)).save(image, format="PNG")
    created = client.post("/v1/videos", data={"prompt": "embers drift", "model": "tiny-i2v", "num_frames": "5",
                                              "steps": "2", "adaptive_resolution": "true"},
                          files={"input_reference": ("fire.png", image.getvalue(), "image/png")})
    assert created.status_code == 200, created.text
    source = wait_status(client, created.json()["id"])
    assert source["status"] == "completed"

    resp = client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "embers drift", "boundary": 0.75})
    assert resp.status_code == 200, resp.text
    remix = wait_status(client, resp.json()["id"])
    assert remix["status"] == "completed", remix
    assert (remix["size"], remix["boundary"]) == (source["size"], 0.75)
    copied = list((settings.storage_dir / remix["id"]).glob("input*"))
    assert copied and copied[0].read_bytes() == next((settings.storage_dir / source["id"]).glob("input*")).read_bytes()
