"""The CPU benchmark scripts run end to end (so the numbers in the README can be re-made): dispatch latency
through a real API process, worker process and redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dispatch_latency_script(tmp_path):
    out = tmp_path / "dispatch.json"
    proc = subprocess.run([sys.executable, "bench/dispatch_latency.py", "--requests", "3", "--warmup", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["requests"] == 3 and set(results) == {"post", "queue_wait", "worker_total", "observed", "overhead",
                                                        "server_added"}
    assert 0 < results["queue_wait"]["p50_ms"] < results["observed"]["p50_ms"]
    assert results["worker_total"]["p50_ms"] < results["observed"]["p50_ms"]
