"""Prometheus text exposition for /metrics, computed from Redis on each scrape.

Everything comes from shared Redis state (queue lengths, the store's counters, the fleet), so
every API replica reports the same numbers and no metrics library or multiprocess setup is needed.
"""

from __future__ import annotations

from server import fleet
from server.store import Store
from turbodiffusion_core.spec import PRIORITIES


def _line(name: str, value: float, **labels: str) -> str:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def _family(name: str, kind: str, help_text: str, lines: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]


def render(store: Store) -> str:
    counters = store.counters()
    out: list[str] = []

    depth = [
        _line("td_queue_depth", store.queues.depth(model, prio), model=model, priority=prio)
        for model in store.queues.known_models()
        for prio in PRIORITIES
    ]
    out += _family("td_queue_depth", "gauge", "Videos waiting in a model's queue.", depth)

    active = store.active_counts()
    out += _family("td_videos", "gauge", "Unfinished videos by state.",
                   [_line("td_videos", n, state=state) for state, n in active.items()])

    out += _family("td_videos_created_total", "counter", "Videos accepted by POST /v1/videos.",
                   [_line("td_videos_created_total", counters.get("created_total", 0.0))])

    finished = [
        _line("td_videos_finished_total", counters.get(f"finished_total:{s}", 0.0), status=s)
        for s in ("completed", "failed", "cancelled")
    ]
    out += _family("td_videos_finished_total", "counter", "Videos that reached a final state.", finished)

    stages = sorted(k.split(":", 1)[1] for k in counters if k.startswith("stage_seconds_count:"))
    summary = []
    for stage in stages:
        summary.append(_line("td_stage_seconds_sum", counters[f"stage_seconds_sum:{stage}"], stage=stage))
        summary.append(_line("td_stage_seconds_count", counters[f"stage_seconds_count:{stage}"], stage=stage))
    out += _family("td_stage_seconds", "summary", "Seconds spent per job stage (total = whole job).", summary)

    workers = fleet.live_workers(store.r)
    out += _family("td_workers", "gauge", "Live GPU workers.", [_line("td_workers", len(workers))])
    per_model: dict[str, int] = {}
    for doc in workers:
        for model in doc.get("models") or {}:
            per_model[model] = per_model.get(model, 0) + 1
    out += _family("td_model_workers", "gauge", "Live workers holding each model.",
                   [_line("td_model_workers", n, model=m) for m, n in sorted(per_model.items())])
    return "\n".join(out) + "\n"
