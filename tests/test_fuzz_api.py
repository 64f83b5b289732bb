"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis + hypothesis)
against a live uvicorn server: whatever the input, the answer is never a 5xx.

No worker runs here, so created videos stay queued; the create operation is fuzzed through both
of its documented content types (JSON and multipart)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.settings import Settings
from tests.conftest import make_settings, uvicorn_in_thread

# The schema only depends on the routes, so build it once from an app that never connects anywhere.
with tempfile.TemporaryDirectory() as _tmp:
    _SCHEMA = create_app(Settings(redis_url="redis://127.0.0.1:1/0", storage_dir=Path(_tmp))).openapi()
# /readyz answers 503 by design while no worker is alive (none runs here).
schema = schemathesis.openapi.from_dict(_SCHEMA).exclude(path="/readyz")


@pytest.fixture(scope="module")
def base_url(redis_server, tmp_path_factory, models_dir):
    url = f"redis://127.0.0.1:{redis_server.port}/62"
    Redis.from_url(url).flushdb()
    app_settings = make_settings(url, tmp_path_factory.mktemp("fuzz") / "storage", models_dir,
                                 models=["tiny-t2v", "tiny-i2v"], max_queue=100_000)
    with uvicorn_in_thread(create_app(app_settings)) as url:
        yield url


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case, base_url):
    case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=10)
