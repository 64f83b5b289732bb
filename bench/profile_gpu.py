"""Where the GPU time of one DiT forward and of one VAE decode goes: kernel tables from torch.profiler, plus
the VAE decode timed in several variants (tap mode, tap-split width, latent frames per pass). For finding
what to speed up next, so it records what ran (kernel names, counts, milliseconds) rather than a headline number.

    python bench/profile_gpu.py --out bench/results/profile_h100.json
    python bench/profile_gpu.py --dit sla+fp8,sagesla+fp8 --vae-variants stacked:96:1,stacked:96:3 --top 40

DiT: the 1.3B model at 480p (81 frames, 32,760 tokens), random weights (bench/random_models.py), one
config per `attention+quant` name as in bench_dit.py; each is timed (median of --repeat forwards) and one
forward is profiled. VAE: the Wan2.1 VAE in bf16, channels-last, 480p 81 frames; each --vae-variants item is
timed (median of --repeat decodes, peak memory, relative difference from the first item's video): the tap mode
(`CausalConv3d.tap_mode`: stacked, in_place, concat), the widest causal conv run as 2D convs over taps
(`tap_split_max_channels`), latent frames per decoder pass, optionally cuDNN's algorithm search; the first
item's decode is profiled.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_dit import LATENTS, time_cuda  # noqa: E402
from bench.random_models import random_dit, random_vae  # noqa: E402


def kernel_table(fn: Callable[[], object], top: int) -> dict:
    """One call of fn under torch.profiler: GPU kernels (and copies) grouped by name, most time first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1000 if hasattr(evt, "device_time") else evt.cuda_time / 1000
        row = rows.setdefault(evt.name, {"name": evt.name[:160], "ms": 0.0, "count": 0})
        row["ms"] += ms
        row["count"] += 1
    ranked = sorted(rows.values(), key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in ranked)
    for r in ranked:
        r["ms"] = round(r["ms"], 3)
    return {"gpu_ms_total": round(total, 2), "kernels": ranked[:top], "distinct_kernels": len(ranked)}


def profile_dit(configs: list[str], warmup: int, repeat: int, top: int) -> list[dict]:
    from turbodiffusion_core.quant import quantize_model_linears

    frames, h, w = LATENTS["480p"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, frames, h, w, device="cuda", generator=g).bfloat16()
    t = torch.tensor([988.0], device="cuda", dtype=torch.bfloat16)
    context = torch.randn(1, 512, 4096, device="cuda", generator=g).bfloat16() * 0.1
    results = []
    for config in configs:
        attention, _, quant = config.partition("+")
        row: dict = {"config": config}
        try:
            model = random_dit("wan2.1-t2v-1.3b", "cuda", torch.bfloat16, seed=1)
            if quant:
                quantize_model_linears(model, quant)
            with torch.inference_mode():
                fwd = lambda: model(x, t, context, attention=attention, sla_topk=0.1)  # noqa: E731
                times = time_cuda(fwd, warmup, repeat)
                row.update(ms_median=round(statistics.median(times), 2), ms_all=[round(v, 2) for v in times])
                row["profile"] = kernel_table(fwd, top)
        except Exception as e:  # record and go on
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        results.append(row)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    return results


def parse_vae_variants(text: str) -> list[tuple[str, int, int, bool]]:
    """"mode:max_channels:frames_per_chunk[:bench]" items, comma-separated (see --vae-variants)."""
    from turbodiffusion_core.models.vae import TAP_MODES

    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if len(fields) not in (3, 4) or fields[0] not in TAP_MODES or (len(fields) == 4 and fields[3] != "bench"):
            raise SystemExit(f"--vae-variants: bad item {item!r} (mode:max_channels:frames_per_chunk[:bench], "
                             f"mode one of {', '.join(TAP_MODES)})")
        variants.append((fields[0], int(fields[1]), int(fields[2]), len(fields) == 4))
    return variants


def profile_vae(variants: list[tuple[str, int, int, bool]], warmup: int, repeat: int, top: int) -> list[dict]:
    from turbodiffusion_core.models.vae import CausalConv3d

    vae = random_vae("wan2.1", "cuda", seed=2).to(torch.bfloat16).use_channels_last()
    g = torch.Generator(device="cuda").manual_seed(3)
    latent = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
    results = []
    reference = None
    defaults = CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels
    for i, (mode, max_channels, n, cudnn_benchmark) in enumerate(variants):
        torch.backends.cudnn.benchmark = cudnn_benchmark
        CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels = mode, max_channels
        vae.decode_chunk_frames = n
        row: dict = {"tap_mode": mode, "tap_split_max_channels": max_channels, "frames_per_chunk": n,
                     "cudnn_benchmark": cudnn_benchmark}
        try:
            with torch.inference_mode():
                fwd = lambda: vae.decode(latent)  # noqa: E731
                torch.cuda.reset_peak_memory_stats()
                out = fwd()
                if reference is None:
                    reference = out.float()
                else:
                    row["rel_err_vs_first"] = float((out.float() - reference).norm() / reference.norm())
                times = time_cuda(fwd, warmup, repeat)
                row.update(ms_median=round(statistics.median(times), 1), ms_all=[round(v, 1) for v in times],
                           peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                if i == 0:
                    row["profile"] = kernel_table(fwd, top)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        results.append(row)
    torch.backends.cudnn.benchmark = False
    CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels = defaults
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.json")
    ap.add_argument("--dit", default="sla+fp8", help="comma-separated attention+quant configs ('' for none)")
    ap.add_argument("--vae-variants", default="stacked:96:1,in_place:96:1,concat:96:1,stacked:192:1,stacked:384:1,"
                    "stacked:96:3",
                    help="VAE decodes to time, mode:max_channels:frames_per_chunk[:bench] each (tap mode, the widest "
                         "conv run as 2D convs over taps, latent frames per decoder pass, ':bench' for cuDNN's "
                         "algorithm search); the first is profiled and the others' outputs compared with it "
                         "('' for none)")
    ap.add_argument("--top", type=int, default=40, help="kernels kept per profile")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    variants = parse_vae_variants(args.vae_variants)
    if not torch.cuda.is_available():
        print("profile_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    record = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith("TD_")},
    }
    configs = [c for c in args.dit.split(",") if c]
    if configs:
        record["dit_1.3b_480p"] = profile_dit(configs, args.warmup, args.repeat, args.top)
    if variants:
        record["vae_480p_81f"] = profile_vae(variants, 1, max(3, args.repeat - 2), args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
