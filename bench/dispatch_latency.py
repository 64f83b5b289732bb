"""Queue dispatch and serving overhead: what the server adds around the engine, one request at a time.

    python bench/dispatch_latency.py                    # 40 requests, tiny model, 2 worker processes' worth of CPU
    python bench/dispatch_latency.py --requests 100 --out bench/results/dispatch_cpu2.json

Starts an embedded redis-server, the API (uvicorn, one process) and one GPU-less worker process on the tiny
model (1 frame, 1 step, so the engine's own time is small), then sends requests one after another through
HTTP, each waiting for the previous video to complete. Per request it records:
- queue_wait: from the record's enqueue (inside POST /v1/videos) to the worker reading it (the job's
  `queue_wait` timing): Redis + RQ dispatch to an idle worker;
- worker_total: the worker's own time for the job (load of the record, the engine, writing the files,
  finishing the record);
- observed: from sending the POST to a GET that sees `completed` (polled every --poll-ms);
- overhead: observed - worker_total - queue_wait: the POST itself, finishing bookkeeping and the poll;
- server_added: observed - worker_total: everything the server adds around the worker's own time.
Medians and p90 go to the JSON; the engine's stages on a GPU are bench/bench_e2e.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.api_load import percentile, start_server  # noqa: E402
from server.launcher import EmbeddedRedis, free_port  # noqa: E402

BODY = {"prompt": "a lighthouse in a storm", "model": "tiny-t2v", "size": "128x96", "num_frames": 1, "steps": 1}


def start_worker(redis_url: str, storage: Path) -> subprocess.Popen:
    env = dict(os.environ, TD_REDIS_URL=redis_url, TD_STORAGE_DIR=str(storage), TD_LOG_LEVEL="WARNING",
               TD_WARMUP="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen([sys.executable, "-m", "worker.main", "--model", "tiny-t2v", "--device", "cpu",
                             "--name", "bench-worker"], cwd=REPO, env=env)


def wait_ready(client: httpx.Client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.2)
    raise RuntimeError("no worker became ready")


def one(client: httpx.Client, poll_s: float) -> dict:
    start = time.perf_counter()
    created = client.post("/v1/videos", json=BODY)
    created.raise_for_status()
    posted = time.perf_counter()
    video_id = created.json()["id"]
    while True:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            break
        time.sleep(poll_s)
    observed = time.perf_counter() - start
    if video["status"] != "completed":
        raise RuntimeError(f"{video_id} failed: {video.get('error')}")
    t = video["timings"]
    return {"post_s": posted - start, "queue_wait_s": t["queue_wait"], "worker_total_s": t["total"],
            "observed_s": observed, "overhead_s": observed - t["total"] - t["queue_wait"],
            "server_added_s": observed - t["total"]}


def stats(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"p50_ms": round(statistics.median(ms), 2), "p90_ms": round(percentile(ms, 90), 2),
            "max_ms": round(max(ms), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured requests first")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="GET interval while waiting for completion")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dispatch.json")
    args = ap.parse_args()

    storage = Path(tempfile.mkdtemp(prefix="td-dispatch-"))
    redis = EmbeddedRedis().start()
    port = free_port()
    api = worker = None
    try:
        api = start_server(port, redis.url, storage)
        worker = start_worker(redis.url, storage)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client)
            for _ in range(args.warmup):
                one(client, args.poll_ms / 1000)
            runs = [one(client, args.poll_ms / 1000) for _ in range(args.requests)]
    finally:
        procs = [proc for proc in (worker, api) if proc is not None]
        for proc in procs:
            proc.terminate()
        for proc in procs:  # a loaded machine can take a while to shut a worker down: never leave one behind
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        redis.stop()

    report = {
        "benchmark": "dispatch_latency",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/dispatch_latency.py", *sys.argv[1:]]),
        "setup": "embedded redis-server, uvicorn (1 process), 1 worker process on tiny-t2v (CPU), one request at a "
                 "time, " + json.dumps(BODY),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "requests": args.requests,
        "poll_ms": args.poll_ms,
        "results": {key.removesuffix("_s"): stats([r[key] for r in runs])
                    for key in ("post_s", "queue_wait_s", "worker_total_s", "observed_s", "overhead_s",
                                "server_added_s")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
