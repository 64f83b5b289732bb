"""API overhead under load: POST /v1/videos and GET /v1/videos/{id} latency at a fixed request rate.

    python bench/api_load.py                      # starts its own Redis + API (no worker), 200 req/s
    python bench/api_load.py --rate 300 --seconds 20
    python bench/api_load.py --url http://host:8000 --api-key sk-...   # an already running server

Open-loop: requests are sent on a fixed schedule (rate per second) whether or not earlier ones
have returned, so a slow server shows up as latency instead of quietly lowering the rate. The
server runs in its own process (uvicorn, one worker process) so the load generator does not
share its interpreter. Without a GPU worker the created videos simply stay queued: this measures
the API and Redis path only. Writes a JSON summary to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.launcher import EmbeddedRedis, free_port  # noqa: E402

BODY = {"prompt": "a lighthouse in a storm", "model": "tiny-t2v", "size": "128x96", "num_frames": 1, "steps": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(latencies_ms: list[float], errors: int, sent: int, wall: float) -> dict:
    return {
        "requests": sent,
        "errors": errors,
        "achieved_rate": round(sent / wall, 1) if wall else None,
        "p50_ms": round(percentile(latencies_ms, 50), 2),
        "p90_ms": round(percentile(latencies_ms, 90), 2),
        "p99_ms": round(percentile(latencies_ms, 99), 2),
        "max_ms": round(max(latencies_ms), 2) if latencies_ms else None,
        "mean_ms": round(statistics.fmean(latencies_ms), 2) if latencies_ms else None,
    }


class Connection:
    """A minimal keep-alive HTTP/1.1 client on one socket. A general client (httpx) costs more CPU
    per request than the server being measured, and on a 2-core machine that would be the number
    we measured."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload


async def run_phase(url: str, headers: dict, make_request, rate: float, seconds: float,
                    connections: int) -> tuple[dict, list]:
    """Send rate*seconds requests, request i due at t0 + i/rate, over a pool of keep-alive
    connections. Latency counts from the due time, so time spent waiting for a free connection
    (the server falling behind) is included rather than hidden."""
    parts = urlsplit(url)
    total = int(rate * seconds)
    latencies: list[float] = []
    bodies: list = []
    errors = 0
    t0 = time.perf_counter() + 0.2
    due = iter(range(total))

    async def client() -> None:
        nonlocal errors
        conn = Connection(parts.hostname, parts.port, headers)
        for i in due:
            when = t0 + i / rate
            await asyncio.sleep(max(0.0, when - time.perf_counter()))
            try:
                status, payload = await make_request(conn, i)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                conn = Connection(parts.hostname, parts.port, headers)
                continue
            latencies.append((time.perf_counter() - when) * 1000)
            if status >= 400:
                errors += 1
            else:
                bodies.append(json.loads(payload))

    await asyncio.gather(*(client() for _ in range(connections)))
    return summary(latencies, errors, total, time.perf_counter() - t0), bodies


async def load(url: str, api_key: Optional[str], rate: float, seconds: float, warmup: float,
               connections: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def post(conn: Connection, i: int):
        return await conn.request("POST", "/v1/videos", json.dumps(dict(BODY, seed=i + 1)).encode())

    await run_phase(url, headers, post, rate, warmup, connections)  # warm connections, caches, code paths
    post_stats, created = await run_phase(url, headers, post, rate, seconds, connections)
    ids = [v["id"] for v in created] or ["video_missing"]

    async def get(conn: Connection, i: int):
        return await conn.request("GET", f"/v1/videos/{ids[i % len(ids)]}")

    get_stats, _ = await run_phase(url, headers, get, rate, seconds, connections)
    return {"post_create": post_stats, "get_status": get_stats}


def start_server(port: int, redis_url: str, storage: Path) -> subprocess.Popen:
    env = dict(os.environ, TD_REDIS_URL=redis_url, TD_MODELS="tiny-t2v", TD_MAX_QUEUE="1000000",
               TD_STORAGE_DIR=str(storage), TD_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "server.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=REPO, env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="target server (default: start Redis + API here)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured warm-up POSTs")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/api_load-*.json)")
    args = parser.parse_args()

    redis = server = None
    url = args.url
    try:
        if not url:
            import tempfile

            redis = EmbeddedRedis().start()
            port = free_port()
            server = start_server(port, redis.url, Path(tempfile.mkdtemp(prefix="td-bench-")))
            url = f"http://127.0.0.1:{port}"
        results = asyncio.run(load(url, args.api_key, args.rate, args.seconds, args.warmup, args.connections))
    finally:
        if server:
            server.terminate()
            server.wait(10)
        if redis:
            redis.stop()

    report = {
        "benchmark": "api_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "target": args.url or "local (uvicorn, 1 process, embedded redis-server, no GPU worker)",
        "rate_per_s": args.rate,
        "seconds_per_phase": args.seconds,
        "connections": args.connections,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": results,
        "bar": {"post_create_p99_ms": 20, "get_status_p99_ms": 10},
    }
    out = args.out or REPO / "bench" / "results" / f"api_load-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
