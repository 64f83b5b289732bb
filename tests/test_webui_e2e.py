"""The web UI at `/` in a real headless Chromium (Playwright) against a live uvicorn server with a
worker thread on the tiny model: fill the form, submit, watch the progress move, see the video
load and play, rate it and write a note, reload and find it in the history with its seed and
rating, reuse its settings; image-to-video upload, an API error shown as it is, and cancel.

Needs Debian's chromium (/usr/bin/chromium, or TD_CHROMIUM) and the `playwright` package (never
`playwright install`); skips without them. Screenshots go to $TD_TEST_ARTIFACTS (default: a
pytest tmp folder)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from server.app import create_app
from tests.conftest import make_settings, uvicorn_in_thread, wait_for
from worker.main import EmbeddedWorker, build_runtime

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = os.environ.get("TD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no chromium browser (apt-get install chromium)", allow_module_level=True)

KEY = "sk-webui-e2e"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]
PROMPT = "A paper boat drifts down a rain gutter at dusk, neon reflections, close-up, cinematic"
STEP_DELAY = 0.5  # seconds the worker sleeps after each denoising step, so progress is visible


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("TD_TEST_ARTIFACTS")
    path = Path(folder) / "webui" if folder else tmp_path_factory.mktemp("webui")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def live(redis_server, tmp_path_factory, models_dir, tiny_residency):
    """Base URL of a live server (uvicorn thread + tiny-t2v worker thread; tiny-i2v accepted but
    served by no worker, so its videos stay queued)."""
    url = f"redis://127.0.0.1:{redis_server.port}/60"
    Redis.from_url(url).flushdb()
    settings = make_settings(url, tmp_path_factory.mktemp("webui-srv") / "storage", models_dir, api_keys=[KEY],
                             models=["tiny-t2v", "tiny-i2v"], test_step_delay=STEP_DELAY)
    worker = EmbeddedWorker(lambda: build_runtime(settings, ["tiny-t2v"], residency=tiny_residency)).start(wait=60)
    try:
        with uvicorn_in_thread(create_app(settings)) as base:
            yield base
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    yield page
    context.close()


def api_get(live: str, path: str) -> dict:
    resp = httpx.get(f"{live}{path}", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    resp.raise_for_status()
    return resp.json()


def open_ui(page, live: str) -> None:
    page.goto(f"{live}/")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def record_progress(page) -> None:
    """Sample the progress bar and the stage line every 30 ms in the page, into window.__seen."""
    page.evaluate("""() => {
        window.__seen = [];
        setInterval(() => window.__seen.push([document.querySelector('#progress').value,
                                              document.querySelector('#stage').textContent]), 30);
    }""")


def test_create_watch_play_rate_reload_reuse(page, live, artifacts):
    open_ui(page, live)
    # defaults come from GET /v1/models (tiny-t2v: 17 frames, 4 steps, resolution "tiny")
    assert page.input_value("#model") == "tiny-t2v"
    assert (page.input_value("#frames"), page.input_value("#steps"), page.input_value("#resolution")) == \
        ("17", "4", "tiny")
    assert page.eval_on_selector("#key-state", "e => e.textContent") == "key saved in this browser"

    page.fill("#prompt", PROMPT)
    page.select_option("#aspect", "4:3")  # tiny 4:3 = 128x96
    page.fill("#seed", "1234")
    page.select_option("#sampler", "ode")
    page.screenshot(path=str(artifacts / "1-form.png"), full_page=True)

    record_progress(page)
    page.click("#submit")
    page.wait_for_function("document.querySelector('#stage').textContent.startsWith('step ')")
    page.screenshot(path=str(artifacts / "2-progress.png"), full_page=True)
    page.wait_for_function("document.querySelector('#job').dataset.status === 'completed'", timeout=90_000)
    video_id = page.inner_text("#job-id")
    assert video_id.startswith("video_")

    # the sampler runs every 30 ms: let it take one sample after the completed state is rendered
    page.wait_for_function("window.__seen.length > 0 && window.__seen[window.__seen.length - 1][0] === 100",
                           timeout=5_000)
    seen = page.evaluate("window.__seen")
    values = [v for v, _ in seen]
    middle = sorted({v for v in values if 0 < v < 100})
    assert len(middle) >= 2, f"the bar never moved through intermediate values: {sorted(set(values))}"
    assert values[-1] == 100 and values == sorted(values), "progress went backwards"
    steps_seen = {s for _, s in seen if s.startswith("step ")}
    assert len(steps_seen) >= 2 and steps_seen <= {f"step {i} of 4" for i in range(1, 5)}, steps_seen
    assert page.inner_text("#stage").startswith("completed") and "seed 1234" in page.inner_text("#stage")

    # the MP4 plays in the page: decoded (readyState >= 2), at 128x96, and its clock advances
    page.wait_for_function("""() => { const v = document.querySelector('#player');
        return !v.hidden && v.readyState >= 2 && v.currentTime > 0.1; }""", timeout=30_000)
    info = page.eval_on_selector("#player", "v => [v.videoWidth, v.videoHeight, v.duration, v.paused, v.error]")
    assert info[:2] == [128, 96] and abs(info[2] - 17 / 16) < 0.1 and info[3] is False and info[4] is None
    page.screenshot(path=str(artifacts / "3-playing.png"), full_page=True)
    link = page.locator("#download")
    assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download") == f"{video_id}.mp4"

    # rate 4 and write a note on the history item; both are kept on the server
    item = page.locator(f'.item[data-id="{video_id}"]')
    item.locator('[data-rating="4"]').click()
    sync_api.expect(item.locator(".rating button.on")).to_have_count(4)
    item.locator(".note").fill("keeper: rain + neon")
    item.locator(".note").press("Tab")  # change event -> POST feedback
    stored = wait_for(lambda: (v := api_get(live, f"/v1/videos/{video_id}"))["note"] and v, 10, what="the note")
    assert (stored["rating"], stored["note"], stored["seed"], stored["status"]) == \
        (4, "keeper: rain + neon", 1234, "completed")

    # reload: the key is remembered, the history shows the video with its seed, rating, note, thumbnail
    page.reload()
    item = page.locator(f'.item[data-id="{video_id}"]')
    sync_api.expect(item).to_be_visible()
    assert page.input_value("#api-key") == KEY
    assert "seed 1234" in item.locator(".params").inner_text()
    assert "128x96" in item.locator(".params").inner_text() and "ODE" in item.locator(".params").inner_text()
    assert item.locator(".prompt").inner_text() == PROMPT
    sync_api.expect(item.locator(".rating button.on")).to_have_count(4)
    sync_api.expect(item.locator(".note")).to_have_value("keeper: rain + neon")
    page.wait_for_function(f"""() => {{ const i = document.querySelector('.item[data-id="{video_id}"] .thumb img');
        return i && !i.hidden && i.complete && i.naturalWidth > 0; }}""")
    page.check("#only-rated")
    sync_api.expect(item).to_be_visible()
    page.screenshot(path=str(artifacts / "4-history-after-reload.png"), full_page=True)

    # "reuse these settings" fills the form, with the seed that was used
    page.fill("#prompt", "something else")
    page.fill("#seed", "0")
    page.select_option("#aspect", "16:9")
    item.locator(".reuse").click()
    assert page.input_value("#prompt") == PROMPT
    assert (page.input_value("#seed"), page.input_value("#aspect"), page.input_value("#frames"),
            page.input_value("#steps"), page.input_value("#sampler")) == ("1234", "4:3", "17", "4", "ode")
    assert page.js_errors == []


def make_quick_video(page, live, prompt: str, seed: str = "0") -> str:
    """Open the page, generate a one-frame one-step video, wait until it completes; its id."""
    open_ui(page, live)
    page.fill("#prompt", prompt)
    page.fill("#frames", "1")
    page.fill("#steps", "1")
    page.fill("#seed", seed)
    page.click("#submit")
    page.wait_for_function("document.querySelector('#job').dataset.status === 'completed'", timeout=60_000)
    return page.inner_text("#job-id")


def test_random_seed_is_shown_as_used(page, live, artifacts):
    video_id = make_quick_video(page, live, "waves on black sand")
    used = api_get(live, f"/v1/videos/{video_id}")["seed"]
    assert used and used > 0
    assert f"seed {used}" in page.inner_text("#stage")
    item = page.locator(f'.item[data-id="{video_id}"]')
    sync_api.expect(item.locator(".params")).to_contain_text(f"seed {used}")

    # seeds run to 2**63 - 1, beyond exact JS numbers: reuse + submit must send the very same one
    item.locator(".reuse").click()
    assert page.input_value("#seed") == str(used)
    page.click("#submit")
    page.wait_for_function(f"(() => {{ const j = document.querySelector('#job'); return j.dataset.status === "
                           f"'completed' && document.querySelector('#job-id').textContent !== '{video_id}'; }})()",
                           timeout=60_000)
    again = api_get(live, f"/v1/videos/{page.inner_text('#job-id')}")
    assert (again["seed"], again["prompt"], again["num_frames"]) == (used, "waves on black sand", 1)
    assert page.js_errors == []


def test_image_to_video_upload_api_error_and_cancel(page, live, artifacts, tmp_path):
    open_ui(page, live)
    page.click('[data-tab="i2v"]')
    assert page.input_value("#model") == "tiny-i2v"
    assert page.is_visible("#image") and page.is_visible("#boundary") and page.is_visible("#adaptive")
    assert page.input_value("#boundary") == "0.9"  # default_boundary from GET /v1/models
    page.fill("#prompt", "the camera slowly dollies in on the lighthouse")

    # without an image the API refuses; the page shows its error as it is
    page.click("#submit")
    sync_api.expect(page.locator("#error")).to_contain_text("400 missing_required_parameter")
    sync_api.expect(page.locator("#error")).to_contain_text("send input_reference")

    image = tmp_path / "first.png"
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (200, 80, 40)).save(buf, format="PNG")
    image.write_bytes(buf.getvalue())
    page.set_input_files("#image", str(image))
    sync_api.expect(page.locator("#image-preview")).to_be_visible()
    page.check("#adaptive")
    page.click("#submit")
    # no tiny-i2v worker runs here: the video waits in the queue until cancelled
    page.wait_for_function("document.querySelector('#stage').textContent.startsWith('queued')")
    assert page.is_hidden("#error")
    video_id = page.inner_text("#job-id")
    queued = api_get(live, f"/v1/videos/{video_id}")
    assert (queued["model"], queued["status"], queued["boundary"]) == ("tiny-i2v", "queued", 0.9)
    page.screenshot(path=str(artifacts / "5-i2v-queued.png"), full_page=True)

    page.click("#cancel")
    sync_api.expect(page.locator("#stage")).to_have_text("cancelled")
    assert api_get(live, f"/v1/videos/{video_id}")["cancelled"] is True
    sync_api.expect(page.locator(f'.item[data-id="{video_id}"] .badge')).to_have_text("cancelled")
    page.screenshot(path=str(artifacts / "6-i2v-cancelled.png"), full_page=True)
    assert page.js_errors == []


def test_remix_and_extend_from_the_job_panel(page, live, artifacts):
    """The finished video's panel offers remix and extend with the prompt in the form; each creates a new video
    through the public API (remix: same settings and seed; extend: the I2V model continues it) and follows it."""
    source = make_quick_video(page, live, "a lantern floats over a dark lake", seed="77")
    assert page.is_visible("#remix") and page.is_visible("#extend")  # tiny-i2v is served here

    page.fill("#prompt", "two lanterns float over a dark lake")
    page.click("#remix")
    page.wait_for_function(f"(() => {{ const j = document.querySelector('#job'); return j.dataset.status === "
                           f"'completed' && document.querySelector('#job-id').textContent !== '{source}'; }})()",
                           timeout=60_000)
    remix = api_get(live, f"/v1/videos/{page.inner_text('#job-id')}")
    assert (remix["remixed_from_video_id"], remix["seed"], remix["prompt"]) == \
        (source, 77, "two lanterns float over a dark lake")
    assert f"remix of {source}" in page.inner_text("#job-params")

    page.fill("#prompt", "the lanterns drift away")
    page.click("#extend")
    # no tiny-i2v worker runs here: the extension waits in the queue (then is cancelled)
    page.wait_for_function(f"document.querySelector('#job-id').textContent !== '{remix['id']}' && "
                           "document.querySelector('#stage').textContent.startsWith('queued')")
    extension = api_get(live, f"/v1/videos/{page.inner_text('#job-id')}")
    assert (extension["extended_from_video_id"], extension["model"]) == (remix["id"], "tiny-i2v")
    page.screenshot(path=str(artifacts / "7-extension-queued.png"), full_page=True)
    page.click("#cancel")
    sync_api.expect(page.locator("#stage")).to_have_text("cancelled")
    assert page.js_errors == [] and page.is_hidden("#error")
