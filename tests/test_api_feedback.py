"""POST /v1/videos/{id}/feedback (extension): a rating (1-5) and a note kept in the video's Redis
record and shown on the Video object (retrieve, list, SSE), owner-scoped like every other route;
plus the static web UI routes at / and /ui/*."""

from __future__ import annotations

import json

import pytest

from server.store import REC
from tests.conftest import FAST, wait_status

A, B = "sk-feedback-a", "sk-feedback-b"
AUTH_A = {"authorization": f"Bearer {A}"}
AUTH_B = {"authorization": f"Bearer {B}"}
BODY = dict(FAST, prompt="a lighthouse in a storm", seed=11)


@pytest.fixture
def api(make_client):
    return make_client(api_keys=[A, B], models=["tiny-t2v"])


def _create(api) -> dict:
    resp = api.post("/v1/videos", json=BODY, headers=AUTH_A)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_rating_and_note_are_kept_and_shown(api, redis_conn):
    video = _create(api)
    assert (video["rating"], video["note"]) == (None, None)
    vid = video["id"]

    resp = api.post(f"/v1/videos/{vid}/feedback", json={"rating": 4, "note": "good seed, 夜の海"}, headers=AUTH_A)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["rating"], resp.json()["note"]) == (4, "good seed, 夜の海")
    assert resp.json()["seed"] == 11
    # stored in the record itself (JSON values, like every other field)
    assert json.loads(redis_conn.hget(REC.format(id=vid), "rating")) == 4

    got = api.get(f"/v1/videos/{vid}", headers=AUTH_A).json()
    assert (got["rating"], got["note"]) == (4, "good seed, 夜の海")
    listed = api.get("/v1/videos", headers=AUTH_A).json()["data"]
    assert [(v["id"], v["rating"]) for v in listed] == [(vid, 4)]

    # a field left out is unchanged; null clears
    only_note = api.post(f"/v1/videos/{vid}/feedback", json={"note": "keep"}, headers=AUTH_A).json()
    assert (only_note["rating"], only_note["note"]) == (4, "keep")
    cleared = api.post(f"/v1/videos/{vid}/feedback", json={"rating": None}, headers=AUTH_A).json()
    assert (cleared["rating"], cleared["note"]) == (None, "keep")


@pytest.mark.parametrize(
    "body, param",
    [({"rating": 0}, "rating"), ({"rating": 6}, "rating"), ({"rating": "great"}, "rating"),
     ({"rating": 2.5}, "rating"), ({"note": "x" * 4001}, "note"), ({"stars": 3}, "stars"), ({}, "rating")],
)
def test_bad_feedback_is_a_400_naming_the_field(api, body, param):
    vid = _create(api)["id"]
    resp = api.post(f"/v1/videos/{vid}/feedback", json=body, headers=AUTH_A)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_feedback_is_owner_scoped_and_never_recreates_a_deleted_video(api, redis_conn):
    vid = _create(api)["id"]
    other = api.post(f"/v1/videos/{vid}/feedback", json={"rating": 1}, headers=AUTH_B)
    assert other.status_code == 404 and other.json()["error"]["code"] == "video_not_found"
    assert api.get(f"/v1/videos/{vid}", headers=AUTH_A).json()["rating"] is None
    assert api.post(f"/v1/videos/{vid}/feedback", json={"rating": 1}).status_code == 401

    assert api.delete(f"/v1/videos/{vid}", headers=AUTH_A).status_code == 200
    gone = api.post(f"/v1/videos/{vid}/feedback", json={"rating": 5}, headers=AUTH_A)
    assert gone.status_code == 404
    assert not redis_conn.exists(REC.format(id=vid))
    # the store refuses too, even without the route's ownership check in front of it
    assert api.app.state.store.set_feedback(vid, rating=5) is None
    assert not redis_conn.exists(REC.format(id=vid))


def test_feedback_given_while_queued_survives_the_worker(make_client, start_worker):
    client = make_client(models=["tiny-t2v"])
    vid = client.post("/v1/videos", json=BODY).json()["id"]
    rated = client.post(f"/v1/videos/{vid}/feedback", json={"rating": 5, "note": "keeper"}).json()
    assert (rated["status"], rated["rating"]) == ("queued", 5)
    start_worker()
    done = wait_status(client, vid)
    assert done["status"] == "completed"
    assert (done["rating"], done["note"], done["seed"]) == (5, "keeper", 11)
    # the parameters the web UI's "reuse these settings" reads back
    assert (done["sla_topk"], done["ode"], done["boundary"]) == (0.1, False, None)


def test_web_ui_is_served_without_a_key(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/app.js"' in page.text and 'href="/ui/app.css"' in page.text
    js = api.get("/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "/feedback" in js.text and "/events" in js.text
    assert api.get("/ui/app.css").headers["content-type"].startswith("text/css")
    assert api.get("/ui/../settings.py").status_code == 404
    assert api.get("/ui/index.html").status_code == 404
    # the UI routes stay out of the API schema; feedback is in it
    paths = api.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/v1/videos/{video_id}/feedback" in paths
