"""The official `openai` SDK against a real uvicorn server with a worker thread (tiny model, CPU):
create with extra_body, create_and_poll, retrieve, list pagination, all three downloads, delete,
error classes, and a cancelled video ending the SDK's poll loop."""

from __future__ import annotations

import io
import time

import av
import httpx
import openai
import pytest
from PIL import Image
from redis import Redis

from server.app import create_app
from tests.conftest import make_settings, uvicorn_in_thread
from worker.main import EmbeddedWorker, build_runtime

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks the Sora API deprecated

KEY = "sk-test-123"
EXTRA = {"steps": 1, "num_frames": 1}  # tiny and fast; arrives as multipart strings


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory, models_dir, tiny_residency):
    """Base URL of a live server (uvicorn thread + worker thread)."""
    url = f"redis://127.0.0.1:{redis_server.port}/63"
    Redis.from_url(url).flushdb()
    settings = make_settings(url, tmp_path_factory.mktemp("sdk") / "storage", models_dir, api_keys=[KEY],
                             test_step_delay=0.0)
    worker = EmbeddedWorker(lambda: build_runtime(settings, ["tiny-t2v"], residency=tiny_residency)).start(wait=60)
    with uvicorn_in_thread(create_app(settings)) as url:
        yield f"{url}/v1"
    worker.stop()


@pytest.fixture
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def test_create_retrieve_poll_download_delete(sdk):
    video = sdk.videos.create(prompt="a koi pond", model="tiny-t2v", size="128x96", extra_body=dict(EXTRA, seed=3))
    assert video.id.startswith("video_") and video.status in ("queued", "in_progress")
    assert sdk.videos.retrieve(video.id).id == video.id

    done = sdk.videos.poll(video.id)
    assert done.status == "completed" and done.progress == 100 and done.seconds == "0" and done.size == "128x96"
    assert done.model_extra["seed"] == 3  # our extension fields survive the SDK's parsing

    mp4 = sdk.videos.download_content(video.id).content
    with av.open(io.BytesIO(mp4)) as container:
        assert len([f for f in container.decode(video=0)]) == 1
    thumb = sdk.videos.download_content(video.id, variant="thumbnail").content
    sheet = sdk.videos.download_content(video.id, variant="spritesheet").content
    assert Image.open(io.BytesIO(thumb)).format == "WEBP"
    assert Image.open(io.BytesIO(sheet)).format == "JPEG"

    deleted = sdk.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)


def test_create_and_poll_and_list_pagination(sdk):
    made = [
        sdk.videos.create_and_poll(prompt=f"tide {i}", model="tiny-t2v", seconds="1", size="128x96",
                                   extra_body={"steps": 1, "priority": "high", "metadata": {"n": str(i)}})
        for i in range(3)
    ]
    assert [v.status for v in made] == ["completed"] * 3
    assert [v.model_extra["num_frames"] for v in made] == [17] * 3  # "1" second = 17 frames at 16 fps
    assert [v.model_extra["metadata"] for v in made] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]

    first = sdk.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    every = [v.id for v in sdk.videos.list(limit=2)]  # the SDK follows after=last_id by itself
    assert every[:3] == [v.id for v in reversed(made)]
    oldest_first = [v.id for v in sdk.videos.list(limit=100, order="asc")]
    assert oldest_first == list(reversed(every))


def test_errors_map_to_sdk_exceptions(sdk, server):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.videos.create(prompt="x", model="tiny-t2v", size="1280x720")
    assert bad.value.code == "unsupported_value" and bad.value.param == "size"
    assert bad.value.request_id  # from x-request-id
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.videos.create(prompt="x", model="sora-2")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0).videos.list()


def test_cancelled_video_ends_the_poll_loop(sdk, server):
    video = sdk.videos.create(prompt="never mind", model="tiny-t2v", size="128x96",
                              extra_body={"steps": 4, "num_frames": 17})
    resp = httpx.post(f"{server}/videos/{video.id}/cancel", headers={"authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200
    started = time.monotonic()
    final = sdk.videos.poll(video.id)
    assert final.status == "failed" and final.error.code == "cancelled"
    assert time.monotonic() - started < 30
