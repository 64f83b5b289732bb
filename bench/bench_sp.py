"""Sequence-parallel DiT latency per GPU count: one 720p 81-frame video, 4 rCM steps, 14B, random weights.

    python bench/bench_sp.py --counts 1,2,4 --out bench/results/sp_h100.json         # spawns each count in turn
    for n in 1 2 4; do torchrun --nproc-per-node $n bench/bench_sp.py --out bench/results/sp_h100.json; done

The path timed is the server's: rank 0 runs the rCM sampler with its DiT behind `ShardedDiT` (one command
and a broadcast of the latent per forward), the other ranks `serve`; with one GPU the plain forward runs
(that is the non-parallel path, so "1 GPU" is the baseline, not SP with N=1). Reported per GPU count:
the 4-step denoise latency (median of --repeat runs after a one-forward warm-up that also compiles the
Triton kernels), ms per forward, speedup and scaling efficiency against 1 GPU, rank 0's peak memory, and
the relative error of the final latent against the 1-GPU one (bf16: GEMMs of other shapes round
differently). Text encoding and VAE decoding stay on rank 0 and are not in these numbers.

Weights: every rank draws the same seeded random weights, then rank 0's are broadcast anyway. Runs on the
CPU with gloo too, for a smoke test: --arch tiny-t2v --latent 3,8,8 --device cpu --attention sla_reference.
Under torchrun, the row for this GPU count replaces any earlier one in --out, and the efficiencies are
recomputed from the rows present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from turbodiffusion_core.models.configs import DIT_CONFIGS  # noqa: E402
from turbodiffusion_core.models.dit import WanModel  # noqa: E402
from turbodiffusion_core.parallel.launch import free_port  # noqa: E402
from turbodiffusion_core.parallel.runtime import ShardedDiT, init_ranks, serve  # noqa: E402
from turbodiffusion_core.parallel.ulysses import check_world_size  # noqa: E402
from turbodiffusion_core.sampling.rcm import rcm_sample  # noqa: E402

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}


def random_dit(arch: str, device: torch.device, dtype: torch.dtype, seed: int) -> WanModel:
    """Seeded random weights allocated straight in the run dtype (no float32 copy of a 14B model)."""
    model = WanModel.on_meta(arch, with_sla_proj=True).set_dtype(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0.0, 0.05, generator=gen)
            elif "proj_l" in name:
                p.normal_(0.0, 0.02, generator=gen)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.01, generator=gen)
            else:  # norm weights
                p.fill_(1.0)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rank(rank: int, world: int, init_method: str | None, local_rank: int, args: argparse.Namespace) -> dict | None:
    """One rank of one GPU count; rank 0 returns its result row."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = DIT_CONFIGS[args.arch]
    ctx = None
    if world > 1:
        check_world_size(cfg.num_heads, world, args.arch)
        ctx = init_ranks(rank, world, device=device, init_method=init_method or "env://")
    t_build = time.perf_counter()
    model = random_dit(args.arch, device, dtype, seed=1)
    if ctx is not None:
        for p in model.parameters():  # same weights everywhere whatever the RNG did
            dist.broadcast(p.data, src=0, group=ctx.sp.group)
    if args.quant:  # after the broadcast: quantizing equal weights gives equal payloads
        from turbodiffusion_core.quant import quantize_model_linears

        quantize_model_linears(model, args.quant)
    sync(device)
    build_s = time.perf_counter() - t_build

    if ctx is not None and rank != 0:
        with torch.inference_mode():
            serve(ctx, {"dit": model})
        dist.destroy_process_group()
        return None

    frames, h, w = args.latent
    gen = torch.Generator(device=device).manual_seed(0)
    context = (torch.randn(1, 512, cfg.text_dim, device=device, generator=gen) * 0.1).to(dtype)
    dit = ShardedDiT(model, "dit", ctx) if ctx is not None else model
    kwargs = {"attention": args.attention, "sla_topk": args.sla_topk}

    def denoise(x, t_input, step_index, t_cur):
        return dit(x, t_input, context, **kwargs)

    def sample() -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(42)
        return rcm_sample(denoise, (1, cfg.out_dim, frames, h, w), steps=args.steps, sigma_max=80.0, generator=g,
                          device=device, model_dtype=dtype)

    row: dict = {"gpus": world, "arch": args.arch, "latent": [frames, h, w], "tokens": frames * (h // 2) * (w // 2),
                 "steps": args.steps, "attention": args.attention, "sla_topk": args.sla_topk,
                 "quant": args.quant or "none", "build_s": round(build_s, 2)}
    try:
        with torch.inference_mode():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            x0 = torch.randn(1, cfg.out_dim, frames, h, w, device=device, generator=gen).to(dtype)
            t0 = time.perf_counter()
            dit(x0, torch.tensor([988.0], device=device, dtype=dtype), context, **kwargs)  # warm-up, compiles
            sync(device)
            row["warmup_forward_s"] = round(time.perf_counter() - t0, 3)
            times, latent = [], None
            for _ in range(args.repeat):
                sync(device)
                t0 = time.perf_counter()
                latent = sample()
                sync(device)
                times.append(time.perf_counter() - t0)
        row.update(denoise_s_median=statistics.median(times), denoise_s_all=times,
                   ms_per_forward=1000 * statistics.median(times) / args.steps)
        if cuda:
            row["peak_gb_rank0"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        ref = Path(args.ref_dir) / f"latent_{args.arch}_{'x'.join(map(str, args.latent))}_{args.attention}.pt"
        if world == 1:
            ref.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latent.float().cpu(), ref)
        elif ref.exists():
            base = torch.load(ref)
            row["rel_err_vs_1gpu"] = ((latent.float().cpu() - base).norm() / base.norm()).item()
    except Exception as e:  # record it: the other GPU counts still run
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        if ctx is not None:
            try:
                ctx.send("exit")
            finally:
                dist.destroy_process_group()
    print(json.dumps({k: v for k, v in row.items() if k != "denoise_s_all"}), flush=True)
    return row


def _spawned(rank: int, world: int, init_method: str, args: argparse.Namespace, out_file: str) -> None:
    row = run_rank(rank, world, init_method, rank, args)
    if row is not None:
        Path(out_file).write_text(json.dumps(row))


def add_scaling(rows: list[dict]) -> list[dict]:
    rows = sorted(rows, key=lambda r: r["gpus"])
    base = next((r for r in rows if r["gpus"] == 1 and "denoise_s_median" in r), None)
    for r in rows:
        if base is not None and "denoise_s_median" in r:
            r["speedup"] = base["denoise_s_median"] / r["denoise_s_median"]
            r["efficiency"] = r["speedup"] / r["gpus"]
    return rows


def environment(args: argparse.Namespace) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": args.device}
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, gpus_visible=torch.cuda.device_count())
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def write(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    result = {"what": f"{args.arch} DiT, {args.steps} rCM steps (denoise only), batch 1, random weights, "
                      "Ulysses sequence parallel over N GPUs",
              **environment(args), "rows": add_scaling(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'gpus':>4} {'denoise s':>10} {'ms/fwd':>9} {'speedup':>8} {'eff':>6} {'GB r0':>6} {'rel err':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['gpus']:>4} ERROR {r['error'][:150]}")
            continue
        print(f"{r['gpus']:>4} {r['denoise_s_median']:>10.3f} {r['ms_per_forward']:>9.1f} "
              f"{r.get('speedup', float('nan')):>8.2f} {r.get('efficiency', float('nan')):>6.2f} "
              f"{r.get('peak_gb_rank0', 0):>6.1f} {r.get('rel_err_vs_1gpu', float('nan')):>9.2e}")
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sp.json")
    ap.add_argument("--counts", default="1,2,4", help="GPU counts to spawn in turn (ignored under torchrun)")
    ap.add_argument("--arch", default="wan2.1-t2v-14b", choices=list(DIT_CONFIGS))
    ap.add_argument("--res", default="720p", choices=list(LATENTS))
    ap.add_argument("--latent", default=None, help="F,H,W of the latent instead of --res (e.g. 3,8,8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--attention", default="sla", help="original, sla, sla_reference, ...")
    ap.add_argument("--sla-topk", type=float, default=0.1)
    ap.add_argument("--quant", default=None, choices=("int8", "fp8"))
    ap.add_argument("--repeat", type=int, default=2, help="timed 4-step runs per GPU count (median)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--rank-timeout", type=float, default=480.0, help="seconds one GPU count may take in all")
    ap.add_argument("--ref-dir", default=os.path.join(tempfile.gettempdir(), "bench_sp"),
                    help="where the 1-GPU final latent is kept for the error column")
    args = ap.parse_args()
    args.latent = tuple(int(v) for v in args.latent.split(",")) if args.latent else LATENTS[args.res]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA GPUs (or --device cpu for a smoke test)", file=sys.stderr)
        return 2

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        row = run_rank(rank, world, None, int(os.environ.get("LOCAL_RANK", rank)), args)
        if rank == 0:
            old = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
            write(args.out, [r for r in old if r["gpus"] != world] + [row], args)
        return 0

    counts = [int(c) for c in args.counts.split(",")]
    if args.device == "cuda" and max(counts) > torch.cuda.device_count():
        print(f"asked for {max(counts)} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    rows = []
    mp = torch.multiprocessing.get_context("spawn")
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "row.json")
            init_method = f"tcp://127.0.0.1:{free_port()}"
            procs = [mp.Process(target=_spawned, args=(r, n, init_method, args, out_file)) for r in range(n)]
            for p in procs:
                p.start()
            deadline = time.monotonic() + args.rank_timeout
            for p in procs:
                p.join(max(1.0, deadline - time.monotonic()))
            for p in procs:  # a rank stuck after another failed (a collective that never completes)
                if p.is_alive():
                    p.terminate()
                    p.join(10)
            if os.path.exists(out_file):
                rows.append(json.loads(Path(out_file).read_text()))
            else:
                rows.append({"gpus": n, "error": f"rank exit codes {[p.exitcode for p in procs]}"})
    write(args.out, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
