"""Shared fixtures: a private Redis, settings, the app, in-process and subprocess workers.

- `redis_server` (session): our own redis-server child (server.launcher.EmbeddedRedis) on a free
  port, so tests never touch the machine's 127.0.0.1:6379 and can flush freely.
- `redis_url`: a fresh, flushed database of that server for each test.
- `settings`: Settings with fast liveness intervals, storage in the test's tmp dir and the tiny
  models' weights in one session folder (written once, on first load).
- `client`: starlette TestClient around create_app(settings) (lifespan runs).
- `residency_for(model)` (session): a tiny model's pipeline, loaded once and lent to in-process workers.
- `start_worker`: start an in-process worker (thread) on the test's settings; stopped at teardown.
- `launch_worker(settings, name)`: a worker subprocess (`python -m worker.main`) for these settings.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from redis import Redis

from server.launcher import EmbeddedRedis, free_port
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
_db_numbers = itertools.cycle(range(1, 64))

# A tiny video that renders in about a second on a CPU: one frame at 128x96, one step.
FAST = {"model": "tiny-t2v", "size": "128x96", "num_frames": 1, "steps": 1}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(databases=64) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_db_numbers)}"
    Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Redis]:
    conn = Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def make_settings(redis_url: str, storage: Path, models_dir: Path, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        storage_dir=storage,
        models_dir=models_dir,
        api_keys=[],
        models=[],
        lease_seconds=1.5,
        sweep_interval=0.3,
        progress_interval=0.0,
        poll_after_ms=100,
        max_retries=2,
        allow_private_webhooks=True,
        log_level="INFO",
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, models_dir: Path) -> Settings:
    return make_settings(redis_url, tmp_path / "storage", models_dir)


@pytest.fixture
def make_client(settings: Settings):
    """Build a TestClient for these settings (optionally changed), closed at teardown."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    clients = []

    def build(**overrides) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def residency_for(models_dir: Path):
    """residency_for(model) -> a Residency holding that tiny model, loaded once per session."""
    from worker.residency import Residency

    loaded: dict[str, Residency] = {}

    def get(model: str) -> Residency:
        if model not in loaded:
            loaded[model] = Residency.load([model], models_dir=models_dir, device="cpu")
        return loaded[model]

    return get


@pytest.fixture(scope="session")
def tiny_residency(residency_for):
    return residency_for("tiny-t2v")


@pytest.fixture
def start_worker(settings: Settings, residency_for):
    """start_worker(model="tiny-t2v", **setting_overrides) -> (EmbeddedWorker, Runtime): a worker thread."""
    from worker.main import EmbeddedWorker, build_runtime

    started = []

    def start(model: str = "tiny-t2v", **overrides):
        worker_settings = settings.model_copy(update=overrides)
        holder = {}

        def build():
            holder["rt"] = build_runtime(worker_settings, [model], residency=residency_for(model))
            return holder["rt"]

        worker = EmbeddedWorker(build).start(wait=60)
        started.append(worker)
        return worker, holder["rt"]

    yield start
    for worker in started:
        worker.stop()


def launch_worker(settings: Settings, name: str, log_path: Optional[Path] = None, **extra_env) -> subprocess.Popen:
    """`python -m worker.main --model tiny-t2v` in a child process configured like `settings`."""
    env = dict(os.environ)
    env.update(settings_env(settings))
    env.update({k: str(v) for k, v in extra_env.items()})
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--model", "tiny-t2v", "--device", "cpu", "--name", name],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings_env(settings: Settings) -> dict[str, str]:
    """The TD_* environment that reproduces `settings` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"TD_{name.upper()}"] = str(value)
    return env


def assert_same_video(a, b, what: str = "", max_mean: float = 1.0) -> None:
    """Two MP4 encodes of the same frames, decoded: the same video up to encoder noise.

    libx264 does not always code identical frames identically within one process (measured here: mean
    |diff| 0.16 and PSNR ~39 dB between two encodes of the tiny model's noisy frames, mean 0.41 / ~50 dB on
    a smooth gradient), so decoded MP4s are compared with bounds that a different video (another seed:
    mean ~18, ~21 dB) is far from. The frames themselves are compared exactly where a test has them.
    `max_mean` allows more for frames that went through H.264 twice (decoded, then encoded again).
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    mean_abs = float(np.abs(a - b).mean())
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert mean_abs < max_mean and psnr > 30.0, (what, mean_abs, psnr)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = ""):
    """Poll until predicate() is truthy; return its value or fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def wait_status(client, video_id: str, statuses=("completed", "failed"), timeout: float = 60.0,
                headers: Optional[dict] = None) -> dict:
    """Poll GET /v1/videos/{id} until its status is one of `statuses`; return the video."""

    def done():
        body = client.get(f"/v1/videos/{video_id}", headers=headers or {}).json()
        return body if body.get("status") in statuses else None

    return wait_for(done, timeout, interval=0.1, what=f"{video_id} to reach {statuses}")


@contextlib.contextmanager
def uvicorn_in_thread(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, what="uvicorn to start")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
