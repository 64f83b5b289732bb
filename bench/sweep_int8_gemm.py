"""Time the per-channel int8 GEMM (quant/rowcol_kernels.py) at each of a grid of tile configurations, beside
bf16 `F.linear`, `torch._int_mm` and the FP8 `torch._scaled_mm`, at the 1.3B DiT's linear shapes (480p,
32,760 tokens). For choosing the autotuner's candidates (`GEMM_CONFIGS`): the autotuner only picks among
those, so a better tile found here has to be added there.

    python bench/sweep_int8_gemm.py --out bench/results/int8_gemm_sweep_h100.json

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"ffn_up": (32760, 1536, 8960), "ffn_down": (32760, 8960, 1536), "qkvo": (32760, 1536, 1536)}
SHARED_MEMORY_BYTES = 227 * 1024


def candidate_tiles() -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that fit an H100's shared memory and registers."""
    out = []
    for bm, bn, bk, warps, stages in itertools.product((64, 128, 256), (128, 256), (64, 128, 256), (4, 8), (2, 3, 4, 5)):
        if (bm + bn) * bk * stages > SHARED_MEMORY_BYTES or bm * bn > 128 * 256:
            continue
        if bm * bn // (warps * 32) > 128:  # int32 accumulator registers a thread
            continue
        if bm == 64 and warps == 8:
            continue
        out.append((bm, bn, bk, warps, stages))
    return sorted(out, key=lambda t: -t[0] * t[1])  # big tiles first: the likeliest winners under a budget


def _time_wgmma_configs(bench, aq, as_, wq, ws, bias, ref_out) -> list[dict]:
    """The Gluon GEMM (quant/wgmma_int8.py) at each of its configurations: ms and rel. err vs the pointer kernel."""
    from turbodiffusion_core.quant import wgmma_int8

    if not wgmma_int8.available(aq.device):
        return [{"error": wgmma_int8.unavailable_reason()}]
    rows = []
    for config in wgmma_int8.fitting_configs(ref_out):
        out = torch.empty_like(ref_out)
        try:
            wgmma_int8.wgmma_int8_matmul(aq, as_, wq, ws, bias, out, config)
            err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
            ms = bench(lambda config=config: wgmma_int8.wgmma_int8_matmul(aq, as_, wq, ws, bias, out, config))
            rows.append({"config": list(config), "ms": round(ms, 4), "rel_err_vs_pointer": err})
        except Exception as e:  # out of shared memory and the like
            rows.append({"config": list(config), "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def _norm_segment(bench, rk) -> dict:
    """What the DiT runs for `h = LN(x) * (1 + scale) + shift; up(h)` (kernels/norm.py, 32,760 tokens, 1536 ->
    8960), in ms: bf16 h and F.linear; int8 rows + scales from the norm kernel and the int8 GEMM; bf16 h and the
    int8 linear with its own row quantizer. Relative errors against the float32 segment."""
    from turbodiffusion_core.kernels.norm import residual_layernorm, residual_layernorm_reference
    from turbodiffusion_core.quant.rowcol_int8 import quantize_int8_rowwise

    m, k, n = SHAPES["ffn_up"]
    torch.manual_seed(1)
    x = torch.randn(1, m, k, device="cuda") * 2
    shift, scale = (torch.randn(1, 1, k, device="cuda") * 0.5 for _ in range(2))
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_int8_rowwise(w)

    def bf16():
        return F.linear(residual_layernorm(x, shift=shift, scale=scale)[1], w, bias)

    def int8_rows():
        _, h, h_scale = residual_layernorm(x, shift=shift, scale=scale, out_dtype=torch.int8)
        return rk.int8_rowcol_matmul(h.view(m, k), h_scale.view(m), wq, ws, bias)

    def int8_linear():
        return rk.int8_rowcol_linear(residual_layernorm(x, shift=shift, scale=scale)[1], wq, ws, bias)

    _, h_ref, _ = residual_layernorm_reference(x, shift=shift, scale=scale, out_dtype=torch.float32)
    dense = F.linear(h_ref.view(m, k), w.float(), bias.float())
    out = {}
    for name, fn in (("bf16 norm + F.linear", bf16), ("int8-row norm + int8 GEMM", int8_rows),
                     ("bf16 norm + int8 linear", int8_linear)):
        got = fn().float().view(m, n)
        out[name] = {"ms": round(bench(fn), 4), "rel_err_vs_fp32": float((got - dense).norm() / dense.norm())}
    base = out["bf16 norm + F.linear"]["ms"]
    for name in out:
        out[name]["speedup_vs_bf16"] = round(base / out[name]["ms"], 3)
    return out


def _host_overhead(rk, kernels: list[str]) -> dict:
    """Microseconds of host time per int8_rowcol_matmul call on a 128x1536x1536 GEMM (the GPU work is a few
    microseconds, so the launch path is what is timed), and per bf16 F.linear for scale."""
    x = torch.randint(-127, 128, (128, 1536), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (1536, 1536), device="cuda", dtype=torch.int8)
    xs, ws = torch.rand(128, device="cuda"), torch.rand(1536, device="cuda")
    bias = torch.zeros(1536, device="cuda", dtype=torch.bfloat16)
    xb, wb = torch.randn(128, 1536, device="cuda", dtype=torch.bfloat16), torch.randn(1536, 1536, device="cuda", dtype=torch.bfloat16)
    calls = {name: (lambda name=name: rk.int8_rowcol_matmul(x, xs, w, ws, bias, kernel=name)) for name in kernels}
    calls["bf16 F.linear"] = lambda: F.linear(xb, wb, bias)
    out = {}
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(300):
            fn()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        out[name] = round(host / 300 * 1e6, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_gemm_sweep.json")
    ap.add_argument("--shapes", default="ffn_up,ffn_down,qkvo")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop trying tiles after this long")
    ap.add_argument("--kernels", default="pointer,tma,tma-persistent,wgmma",
                    help="GEMM kernels (quant/rowcol_kernels.GEMM_KERNELS) to time autotuned, beside the tile sweep")
    ap.add_argument("--no-tiles", action="store_true", help="skip the pointer kernel's tile sweep")
    ap.add_argument("--norm-segment", action="store_true",
                    help="also the DiT's norm2 + FFN up segment: bf16 norm + F.linear against the norm writing int8 "
                         "rows + the int8 GEMM, and against the bf16 norm + the whole int8 linear")
    ap.add_argument("--host-overhead", action="store_true",
                    help="also the host time of one call per kernel (a tiny GEMM, 300 calls, one sync)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sweep_int8_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from turbodiffusion_core.quant import rowcol_kernels as rk
    from turbodiffusion_core.quant.kernels import fp8_matmul, quantize_rows_fp8
    from turbodiffusion_core.quant.fp8 import quantize_fp8_rowwise
    from turbodiffusion_core.quant.rowcol_int8 import quantize_int8_rowwise

    def bench(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    kernel = rk._int8_rowcol_gemm_kernel.fn  # the heuristics-wrapped kernel under the autotuner
    started = time.monotonic()
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "shapes": {}}
    tiles = candidate_tiles()
    for name in args.shapes.split(","):
        m, k, n = SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        aq, as_ = rk.quantize_rows_int8(x)
        wq, ws = quantize_int8_rowwise(w)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        xf, xs = quantize_rows_fp8(x)
        wf, wfs = quantize_fp8_rowwise(w)
        dense = F.linear(x.float(), w.float(), bias.float())  # the unquantized product in float32
        row = {
            "m_k_n": [m, k, n],
            "bf16_linear_rel_err_vs_fp32": float((F.linear(x, w, bias).float() - dense).norm() / dense.norm()),
            "bf16_linear_ms": bench(lambda: F.linear(x, w, bias)),
            "fp8_scaled_mm_ms": bench(lambda: fp8_matmul(xf, xs, wf, wfs, bias)),
            "autotuned_int8_ms": bench(lambda: rk.int8_rowcol_matmul(aq, as_, wq, ws, bias, kernel="pointer")),
            "autotuned_choice": {str(key): str(cfg) for key, cfg in getattr(rk._int8_rowcol_gemm_kernel, "cache", {}).items()},
        }
        # each GEMM kernel autotuned, alone and as the whole linear (row quantizer + GEMM), rel. err vs pointer
        ref_out = rk.int8_rowcol_matmul(aq, as_, wq, ws, bias, kernel="pointer")
        for gemm in args.kernels.split(","):
            try:
                got = rk.int8_rowcol_matmul(aq, as_, wq, ws, bias, kernel=gemm)
                row[f"{gemm}_gemm_ms"] = bench(lambda: rk.int8_rowcol_matmul(aq, as_, wq, ws, bias, kernel=gemm))
                row[f"{gemm}_linear_ms"] = bench(  # int8_rowcol_linear's steps, with this GEMM kernel
                    lambda: rk.int8_rowcol_matmul(*rk.quantize_rows_int8(x), wq, ws, bias, kernel=gemm))
                row[f"{gemm}_rel_err_vs_pointer"] = float((got.float() - ref_out.float()).norm() / ref_out.float().norm())
                linear_out = rk.int8_rowcol_matmul(*rk.quantize_rows_int8(x), wq, ws, bias, kernel=gemm)
                row[f"{gemm}_linear_rel_err_vs_fp32"] = float((linear_out.float() - dense).norm() / dense.norm())
                row[f"{gemm}_linear_speedup_vs_bf16"] = round(row["bf16_linear_ms"] / row[f"{gemm}_linear_ms"], 3)
            except Exception as e:
                row[f"{gemm}_error"] = f"{type(e).__name__}: {e}"[:300]
        if "wgmma" in args.kernels.split(","):
            row["wgmma_configs"] = _time_wgmma_configs(bench, aq, as_, wq, ws, bias, ref_out)
        row["tma_choice"] = {str(key): str(cfg) for key, cfg in getattr(rk._int8_rowcol_gemm_tma_kernel, "cache", {}).items()}
        try:
            wt = wq.t()  # [K, N] column-major: the weight as stored, what cuBLASLt's int8 path wants
            row["torch_int_mm_ms"] = bench(lambda: torch._int_mm(aq, wt))
        except Exception as e:
            row["torch_int_mm_error"] = f"{type(e).__name__}: {e}"[:300]
        tiles_ms = []
        for bm, bn, bk, warps, stages in ([] if args.no_tiles else tiles):
            if time.monotonic() - started > args.budget_s:
                row["stopped_early"] = True
                break
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)

            def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, grid=grid):
                kernel[grid](aq, as_, wq, ws, bias, out, m, n, k, aq.stride(0), wq.stride(0), out.stride(0),
                             HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                             num_warps=warps, num_stages=stages)
            try:
                tiles_ms.append({"tile": [bm, bn, bk, warps, stages], "ms": round(bench(run), 4)})
            except Exception as e:  # out of resources and the like
                tiles_ms.append({"tile": [bm, bn, bk, warps, stages], "error": f"{type(e).__name__}"[:80]})
        ranked = sorted((t for t in tiles_ms if "ms" in t), key=lambda t: t["ms"])
        row["best_tiles"] = ranked[:8]
        row["tiles_tried"] = len(tiles_ms)
        row["failed_tiles"] = [t for t in tiles_ms if "error" in t][:10]
        record["shapes"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "failed_tiles"}), flush=True)
    if args.norm_segment:
        record["norm_ffn_up_segment"] = _norm_segment(bench, rk)
        print("norm + FFN up", record["norm_ffn_up_segment"], flush=True)
    if args.host_overhead:
        record["host_us_per_call"] = _host_overhead(rk, args.kernels.split(","))
        print("host us per call", record["host_us_per_call"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
