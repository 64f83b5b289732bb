"""A worker that owns a group of GPUs and runs each video over all of them (sequence parallel).

    python -m worker.group --model turbowan2.1-t2v-14b-720p --gpus 0,1,2,3

This process is rank 0 of a turbodiffusion_core.parallel group, and it is an ordinary RQ worker: same
queues, heartbeat, lease, cooperative cancel and progress as `worker.main`. Only its pipelines differ:
their DiT forwards run over every GPU of the group. The other ranks are processes it spawns; they hold
only the DiT weights and follow rank 0's commands (so cancel and progress need nothing across ranks: a
cancelled job simply sends no more DiT steps). They exit when this process exits or disappears.

If a parallel forward fails (a rank died, a collective errored), the group is out of step for good:
the worker stops taking jobs and exits with status 3 so that its supervisor (systemd, compose, k8s)
restarts the whole group; the job's lease runs out and another worker retries it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Optional

from server.settings import Settings
from turbodiffusion_core.spec import ATTENTION_TYPES, PRESETS
from worker.main import VideoWorker, build_runtime, settings_from_args, work
from worker.residency import Residency
from worker.runtime import Runtime

log = logging.getLogger("turbodiffusion.worker")

BROKEN_EXIT = 3


def group_runtime(settings: Settings, group, name: Optional[str] = None) -> Runtime:
    """The worker Runtime of a started group (turbodiffusion_core.parallel.launch.ParallelGroup)."""
    return build_runtime(settings, list(group.pipelines), residency=Residency(group.pipelines), name=name)


def stop_when_broken(group, worker: VideoWorker, interval: float = 1.0) -> threading.Event:
    """Stop `worker` once the group reports a failed parallel forward; the returned event is set then."""
    fired = threading.Event()

    def watch() -> None:
        while not fired.wait(interval):
            if group.broken:
                log.error("sequence-parallel group broken (%s): stopping this worker", group.broken)
                worker.stop()
                fired.set()

    threading.Thread(target=watch, name="sp-group-watch", daemon=True).start()
    return fired


def run(args: argparse.Namespace) -> int:
    from turbodiffusion_core.errors import EngineError
    from turbodiffusion_core.parallel.launch import start_group

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        log.error("set TD_REDIS_URL (or --redis-url) to the Redis the API uses")
        return 2
    try:
        group = start_group(args.model, gpus=args.gpus, world_size=args.ranks, device=args.device,
                            models_dir=settings.models_dir, attention=args.attention, quant=args.quant)
    except EngineError as e:
        log.error("%s", e)
        return 2
    if group is None:  # a torchrun rank other than 0: it served rank 0 until the group closed
        return 0
    watches: list[threading.Event] = []
    try:
        rt = group_runtime(settings, group, name=args.name)
        work(rt, on_worker=lambda worker: watches.append(stop_when_broken(group, worker)))
    finally:
        group.close()
    return BROKEN_EXIT if any(w.is_set() for w in watches) else 0


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m worker.group", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, choices=list(PRESETS), metavar="MODEL",
                        help="model to serve (repeatable)")
    parser.add_argument("--gpus", default=None, help="GPU indices of the group, e.g. 0,1,2,3")
    parser.add_argument("--ranks", type=int, default=None, help="number of ranks without --gpus (CPU: --device cpu)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default %(default)s)")
    parser.add_argument("--quant", default=None, choices=("int8", "fp8"), help="quantize the DiT linears")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_TYPES)
    parser.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    parser.add_argument("--redis-url", default=None, help="overrides TD_REDIS_URL")
    parser.add_argument("--models-dir", default=None, help="overrides TD_MODELS_DIR")
    parser.add_argument("--storage-dir", default=None, help="overrides TD_STORAGE_DIR")
    parser.set_defaults(func=run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
