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


def test_gpu_only_scripts_explain_themselves_and_refuse_a_cpu(tmp_path):
    """The GPU measurement scripts print their usage, and on a machine without CUDA say so and exit 2 instead
    of writing a result file."""
    import torch

    for script in ("bench/profile_gpu.py", "bench/sweep_int8_gemm.py"):
        usage = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert usage.returncode == 0 and "CUDA GPU" in usage.stdout, usage.stderr[-2000:]
        if torch.cuda.is_available():
            continue
        out = tmp_path / (Path(script).stem + ".json")
        proc = subprocess.run([sys.executable, script, "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and not out.exists()
    bad = subprocess.run([sys.executable, "bench/profile_gpu.py", "--vae-variants", "stacked:96:1,sideways:96:1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "bad item 'sideways:96:1'" in bad.stderr


def test_mp4_tail_script(tmp_path):
    out = tmp_path / "tail.json"
    proc = subprocess.run([sys.executable, "bench/mp4_tail.py", "--frames", "9", "--size", "96x64", "--repeat", "1",
                           "--pace-ms", "5", "--params", "", "threads=2", "--encoders", "thread,process",
                           "--main", "busy", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["encoder"], r["main_thread"], r["x264_params"]) for r in report["rows"]] == [
        ("thread", "busy", ""), ("thread", "busy", "threads=2"), ("process", "busy", ""), ("process", "busy", "threads=2")]
    for row in report["rows"]:
        assert row["bytes"] > 0 and 0 <= row["tail_s"] <= row["total_s"] and row["busy_s"] > 0
