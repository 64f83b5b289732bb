"""`turbodiffusion serve`: the whole server in one command, for a laptop or a single GPU box.

It starts, in one process:
- Redis: TD_REDIS_URL if set, else an embedded `redis-server` child on a free loopback port
  (in-memory, gone when serve stops);
- one video worker on a thread (worker.main.EmbeddedWorker; a thread because a forked child
  cannot use CUDA once the parent has initialised it), loading its models in the background
  while the API already accepts (and queues) requests;
- the webhook delivery worker on another thread;
- the API under uvicorn in the main thread (Ctrl+C stops everything, the current video first).

Without --model it serves the TurboWan2.1 T2V 1.3B preset when a GPU and its weights are
present, otherwise the tiny random-weight model, and says so.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.redis_client import connect
from server.settings import Settings
from turbodiffusion_core.spec import ATTENTION_TYPES, PRESETS

log = logging.getLogger("turbodiffusion.serve")

DEFAULT_GPU_MODEL = "turbowan2.1-t2v-1.3b-480p"
FALLBACK_MODEL = "tiny-t2v"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private redis-server child process on a free loopback port, in a temporary folder."""

    def __init__(self, executable: str = "redis-server", databases: int = 16, port: int = 0):
        self.executable = shutil.which(executable) or executable
        self.databases = databases
        self.port = port  # 0: a free port, chosen at start
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self._dir = tempfile.TemporaryDirectory(prefix="td-redis-")
        self.port = self.port or free_port()
        self._proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--databases", str(self.databases), "--dir", self._dir.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl+C reaches serve only; serve stops Redis last, after the workers
        )
        deadline = time.monotonic() + timeout
        probe = Redis(port=self.port, socket_connect_timeout=0.2)
        while True:
            try:
                probe.ping()
                break
            except RedisConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"could not start {self.executable} on port {self.port}") from None
                time.sleep(0.05)
        probe.close()
        log.info("embedded redis-server on 127.0.0.1:%d (in memory; set TD_REDIS_URL to use your own)", self.port)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def default_models(settings: Settings) -> list[str]:
    """The real 1.3B model when this machine can run it, else the tiny one (with a log line why)."""
    import torch

    from turbodiffusion_core.pipeline import missing_files

    if not torch.cuda.is_available():
        log.warning("no CUDA GPU found: serving %s (random weights, noise-like output) so the API can be tried; "
                    "pass --model to choose", FALLBACK_MODEL)
        return [FALLBACK_MODEL]
    missing = missing_files(PRESETS[DEFAULT_GPU_MODEL], Path(settings.models_dir))
    if missing:
        log.warning("weights of %s not found in %s: serving %s instead (run `turbodiffusion download %s`)",
                    DEFAULT_GPU_MODEL, settings.models_dir, FALLBACK_MODEL, DEFAULT_GPU_MODEL)
        return [FALLBACK_MODEL]
    return [DEFAULT_GPU_MODEL]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    models: Optional[list[str]] = None,
    device: str = "auto",
    attention: str = "auto",
    quant: Optional[str] = None,
) -> None:
    import uvicorn

    from server.app import create_app
    from worker.main import EmbeddedWorker, build_runtime
    from worker.webhook_worker import run_webhook_worker

    embedded = EmbeddedRedis().start() if not settings.redis_url else None
    try:
        if embedded:
            settings = settings.model_copy(update={"redis_url": embedded.url})
        models = models or default_models(settings)
        settings = settings.model_copy(update={"models": list(dict.fromkeys([*settings.models, *models]))})
        api = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port,
                                            log_level=settings.log_level.lower()))

        def worker_failed(exc: BaseException) -> None:
            # No worker means queued videos would wait forever: stop serving instead of accepting them.
            log.error("the video worker failed (%s: %s); shutting the server down", type(exc).__name__, exc)
            api.should_exit = True

        worker = EmbeddedWorker(
            lambda: build_runtime(settings, models, device=device, attention=attention, quant=quant),
            name="video-worker",
            on_error=worker_failed,
        ).start(wait=None)
        hooks_stop = threading.Event()
        hooks = threading.Thread(
            target=run_webhook_worker,
            args=(connect(settings.redis_url),),
            kwargs={"stop_event": hooks_stop, "logging_level": settings.log_level},
            name="webhook-worker",
            daemon=True,
        )
        hooks.start()
        log.info("serving %s on http://%s:%d/v1 (worker loading in the background)", ", ".join(models), host, port)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was
        # there before it: make that a KeyboardInterrupt for SIGTERM too, so the cleanup below (finish the
        # current video, stop the embedded Redis) runs instead of the process dying on the spot.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            api.run()
        except KeyboardInterrupt:
            pass  # uvicorn has shut the API down and re-raises the Ctrl+C it caught
        finally:
            log.info("shutting down: finishing the current video, stopping workers")
            hooks_stop.set()
            worker.stop()
            hooks.join(timeout=10)
        if worker.error is not None:
            raise SystemExit(1)
    finally:
        if embedded:
            embedded.stop()


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand; its handler is `args.func(args) -> int`."""
    env_help = "\n".join(
        f"  TD_{name.upper():<26} {field.description or ''}" for name, field in Settings.model_fields.items()
    )
    parser = subparsers.add_parser(
        "serve",
        help="run the API, an embedded Redis, a video worker and the webhook worker in one process",
        description=(
            "OpenAI-compatible video API at http://HOST:PORT/v1 with everything it needs in one process. "
            "Without --model: the TurboWan2.1 1.3B model on a GPU with its weights, else the tiny model."
        ),
        epilog="environment variables:\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--model", action="append", default=None, choices=list(PRESETS), metavar="MODEL",
                        help=f"model to serve (repeatable): {', '.join(PRESETS)}")
    parser.add_argument("--device", default="auto", help="worker device: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--quant", default=None, choices=("int8", "fp8"), help="quantize the DiT linears")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_TYPES,
                        help="attention backend (default %(default)s: the fastest available)")
    parser.set_defaults(func=_run_from_args)
    return parser


def _run_from_args(args: argparse.Namespace) -> int:
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings, host=args.host, port=args.port, models=args.model, device=args.device,
          attention=args.attention, quant=args.quant)
    return 0
