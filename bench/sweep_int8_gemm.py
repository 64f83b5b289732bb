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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_gemm_sweep.json")
    ap.add_argument("--shapes", default="ffn_up,ffn_down,qkvo")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop trying tiles after this long")
    ap.add_argument("--kernels", default="pointer,tma,tma-persistent",
                    help="GEMM kernels (quant/rowcol_kernels.GEMM_KERNELS) to time autotuned, beside the tile sweep")
    ap.add_argument("--no-tiles", action="store_true", help="skip the pointer kernel's tile sweep")
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
        row = {
            "m_k_n": [m, k, n],
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
                row[f"{gemm}_linear_speedup_vs_bf16"] = round(row["bf16_linear_ms"] / row[f"{gemm}_linear_ms"], 3)
            except Exception as e:
                row[f"{gemm}_error"] = f"{type(e).__name__}: {e}"[:300]
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
