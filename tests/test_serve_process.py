"""`turbodiffusion serve` as a real process: it stops when its worker cannot start, and a SIGTERM shuts it
down cleanly, embedded Redis included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, TD_MODELS_DIR=str(tmp_path / "models"), TD_STORAGE_DIR=str(tmp_path / "out"),
               PYTHONUNBUFFERED="1")
    env.pop("TD_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "turbodiffusion", "serve", "--port", str(port), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _redis_pids_of(log: str) -> list[str]:
    """PIDs of redis-server processes listening on the port the log says the embedded Redis used."""
    port = log.split("embedded redis-server on 127.0.0.1:")[1].split()[0]
    found = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{port}"], capture_output=True, text=True)
    return found.stdout.split()


def test_serve_exits_when_its_worker_cannot_load(tmp_path):
    """Regression: a worker that failed to load left the API accepting videos that nobody would ever run."""
    proc, _ = _serve(tmp_path, "--model", "turbowan2.1-t2v-1.3b-480p", "--device", "cpu")  # no weights here
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1, out
    assert "missing model files" in out and "shutting the server down" in out
    assert _redis_pids_of(out) == []


def test_sigterm_shuts_down_cleanly_and_stops_the_embedded_redis(tmp_path):
    """Regression: uvicorn re-raised SIGTERM after its own shutdown, killing the process before the embedded
    Redis was stopped."""
    proc, port = _serve(tmp_path, "--model", "tiny-t2v", "--device", "cpu")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(proc.communicate()[0])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "shutting down" in out, out
    assert _redis_pids_of(out) == [], out
