"""Time one DiT forward at the real shapes on a GPU: diffusers (baseline) vs ours per backend and precision.

    python bench/bench_dit.py --out bench/results/dit_h100.json [--with-14b] [--configs original,sla,sla+fp8]

A config is attention[+quant][+graph]: attention original / sla / sagesla, quant fp8 / int8 / int8-tile /
int8-rowcol (the last two choose the int8 GPU kernel, TD_INT8_KERNEL); +graph replays the forward from a CUDA
graph (turbodiffusion_core/cuda_graphs.py; captured in the warm-up).

Random weights (none can be downloaded), the same weights in both implementations, one 81-frame video
latent at 480p (32,760 tokens; 720p: 75,600), batch 1, bf16, medians of CUDA-event timings after warm-up.
Each configuration also reports its output's relative error against diffusers' output, peak memory, and
any error it raised (a failing configuration does not stop the others). Writes JSON with the GPU name and
versions, and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.diffusers_twin import diffusers_twin  # noqa: E402
from bench.random_models import random_dit  # noqa: E402
from turbodiffusion_core.cuda_graphs import GraphedForward  # noqa: E402
from turbodiffusion_core.models.configs import DIT_CONFIGS  # noqa: E402

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}


def time_cuda(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()




def bench_arch(arch: str, res: str, configs: list[str], warmup: int, repeat: int, baseline: bool) -> list[dict]:
    from turbodiffusion_core.quant import quantize_model_linears

    cfg = DIT_CONFIGS[arch]
    frames, h, w = LATENTS[res]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, cfg.out_dim, frames, h, w, device="cuda", generator=g).bfloat16()
    y = None
    if cfg.in_dim > cfg.out_dim:
        y = torch.randn(1, cfg.in_dim - cfg.out_dim, frames, h, w, device="cuda", generator=g).bfloat16()
    t = torch.tensor([988.0], device="cuda", dtype=torch.bfloat16)
    context = torch.randn(1, 512, cfg.text_dim, device="cuda", generator=g).bfloat16() * 0.1
    tokens = frames * (h // 2) * (w // 2)
    rows = []
    model = random_dit(arch, "cuda", torch.bfloat16, seed=1)
    reference = None

    if baseline:
        twin = diffusers_twin(model, device="cuda", dtype=torch.bfloat16)
        hidden = torch.cat([x, y], 1) if y is not None else x
        with torch.inference_mode():
            fwd = lambda: twin(hidden, t, context, return_dict=False)[0]  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            reference = fwd().float()
            times = time_cuda(fwd, warmup, repeat)
        rows.append({"impl": "diffusers WanTransformer3DModel", "arch": arch, "res": res, "tokens": tokens,
                     "config": "baseline (SDPA, bf16)", "ms_median": statistics.median(times), "ms_all": times,
                     "peak_gb": torch.cuda.max_memory_allocated() / 2**30})
        del twin
        gc.collect()
        torch.cuda.empty_cache()

    current_quant = None
    for config in configs:
        parts = config.split("+")
        graphed = "graph" in parts  # "+graph": the forward replayed from a CUDA graph (cuda_graphs.py)
        attention, quant = parts[0], "+".join(p for p in parts[1:] if p != "graph") or None
        variant = quant  # int8-rowcol / int8-tile also pick the int8 GPU kernel (TD_INT8_KERNEL)
        if quant and quant.startswith("int8-"):
            quant = "int8"
            os.environ["TD_INT8_KERNEL"] = variant.split("-", 1)[1]  # read when the weights are quantized
        row = {"impl": "ours", "arch": arch, "res": res, "tokens": tokens, "config": config}
        try:
            if variant != current_quant:
                if current_quant is not None:  # quantization is one-way: rebuild from the same seed
                    del model
                    gc.collect()
                    torch.cuda.empty_cache()
                    model = random_dit(arch, "cuda", torch.bfloat16, seed=1)
                if quant:
                    quantize_model_linears(model, quant)
                current_quant = variant
            with torch.inference_mode():
                call = GraphedForward(model) if graphed else model
                fwd = lambda: call(x, t, context, y=y, attention=attention, sla_topk=0.1)  # noqa: E731
                torch.cuda.reset_peak_memory_stats()
                out = fwd()
                times = time_cuda(fwd, warmup, repeat)
            row.update(ms_median=statistics.median(times), ms_all=times,
                       peak_gb=torch.cuda.max_memory_allocated() / 2**30)
            if graphed:
                row["graph_stats"] = call.stats()
                if call.failed:
                    row["graph_failed"] = next(iter(call.failed.values()))[:300]
            if reference is not None:
                row["rel_err_vs_diffusers"] = rel_err(out, reference)
        except Exception as e:  # record and go on: one broken path must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dit.json")
    ap.add_argument("--configs", default="original,sla,original+fp8,sla+fp8,sla+int8",
                    help="comma list of attention[+quant] for the 1.3B model (\"\" skips it)")
    ap.add_argument("--with-14b", action="store_true", help="also the 14B DiT at 480p and 720p, one forward each")
    ap.add_argument("--configs-14b", default="original,sla+fp8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    rows = []
    if args.configs:  # --configs "" skips the 1.3B rows (e.g. to run the 14B ones alone)
        rows += bench_arch("wan2.1-t2v-1.3b", "480p", args.configs.split(","), args.warmup, args.repeat,
                           baseline=True)
    if args.with_14b:
        for res in ("480p", "720p"):
            rows += bench_arch("wan2.1-t2v-14b", res, args.configs_14b.split(","), 1, 1, baseline=True)
    import triton

    result = {
        "what": "one DiT forward, batch 1, 81 frames, random weights, bf16 activations",
        "command": "python " + " ".join(sys.argv),
        "engine_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TD_")},
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}")
    print(f"{'impl':32} {'model':18} {'res':5} {'config':22} {'ms':>9} {'GB':>6} {'rel err':>9}")
    for r in rows:
        ms = f"{r['ms_median']:.1f}" if "ms_median" in r else "ERROR"
        err = f"{r['rel_err_vs_diffusers']:.2e}" if "rel_err_vs_diffusers" in r else ""
        gb = f"{r['peak_gb']:.1f}" if "peak_gb" in r else ""
        print(f"{r['impl'][:32]:32} {r['arch']:18} {r['res']:5} {r['config']:22} {ms:>9} {gb:>6} {err:>9}")
        if "error" in r:
            print(f"    {r['error'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
