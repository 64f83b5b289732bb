#!/usr/bin/env python3
"""Check and time our Triton kernels on a CUDA GPU at the real Wan 1.3B 480p shapes.

For every kernel: fresh random inputs; the caching allocator is first handed a block filled with NaN bytes
of the output's size (so an output element the kernel forgets to write shows up as NaN or garbage); the
relative error ||out - ref|| / ||ref|| against the PyTorch reference of the same math; then the median
time (triton.testing.do_bench) beside its baseline, measured in the same run: SDPA for SLA, bf16
nn.Linear for the quantized linears, the unfused PyTorch ops for the fused elementwise kernels.

Prints a table, writes JSON (GPU, torch/triton/CUDA versions, the command, every row, the autotuner's
choices) to --out, and exits 1 if any correctness check failed (2 without CUDA).

    python bench/check_kernels.py [--out bench/results/kernels.json] [--quick] [--only sla,quant,fused]

--quick uses smaller shapes (a smoke test, about a quarter of the tokens); the figures to report come
from the default shapes. Rows marked "info" are measured and reported but never fail the run (the
error of quantization itself against bf16, for instance).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import the checkout's turbodiffusion_core

# Wan2.1 1.3B at 480p (832x480), 81 frames: latent 21x60x104, patch 1x2x2 -> 21*30*52 tokens.
TOKENS = 21 * 30 * 52
DIM, FFN_DIM, HEADS, HEAD_DIM = 1536, 8960, 12, 128
TOPKS = (0.05, 0.10, 0.15)


@dataclass
class Row:
    section: str
    name: str
    shape: str
    ms: Optional[float] = None
    baseline: str = ""
    baseline_ms: Optional[float] = None
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    gating: bool = True
    ok: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        if self.ms and self.baseline_ms:
            return self.baseline_ms / self.ms
        return None


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.errors: list[dict] = []

    def add(self, row: Row) -> Row:
        if row.rel_err is not None and row.tol is not None:
            row.ok = math.isfinite(row.rel_err) and row.rel_err <= row.tol
        self.rows.append(row)
        status = "ok" if row.ok else ("FAIL" if row.gating else "above-target")
        err = f"{row.rel_err:.2e}" if row.rel_err is not None else "-"
        ms = f"{row.ms:.3f}" if row.ms is not None else "-"
        print(f"  [{status}] {row.section}/{row.name} {row.shape}: {ms} ms, err {err} {row.note}", flush=True)
        return row

    def crashed(self, section: str, exc: BaseException) -> None:
        text = traceback.format_exc()
        print(f"  [FAIL] {section}: {exc!r}\n{text}", flush=True)
        self.errors.append({"section": section, "error": repr(exc), "traceback": text})

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(r.gating and not r.ok for r in self.rows)


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU (after one untimed call, which also runs any autotuning)."""
    import triton

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn recorded once as a CUDA graph and replayed, as the pipeline runs the DiT
    (TD_CUDA_GRAPHS): the GPU time without the host's launch gaps between small kernels."""
    fn()  # autotuning and lazy setup happen outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def poison(nbytes: int) -> None:
    """Leave a freed block of NaN bytes (0xFF) in the caching allocator for the next output to reuse."""
    block = torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")
    del block


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ SLA


def check_sla(report: Report, tokens: int) -> None:
    from turbodiffusion_core.attention import sla_triton as st
    from turbodiffusion_core.attention.sdpa import sdpa_attention
    from turbodiffusion_core.attention.sla_reference import (
        sla_block_map,
        sla_linear_branch,
        sla_reference,
        sla_sparse_branch,
    )

    shape = (1, tokens, HEADS, HEAD_DIM)
    label = "x".join(map(str, shape))
    torch.manual_seed(0)
    q, k = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    # A per-channel offset in v gives the linear branch (a weighted mean of all values) an O(1) output.
    v = (torch.randn(shape, device="cuda") + torch.randn(HEAD_DIM, device="cuda")).to(torch.bfloat16)
    proj = torch.nn.Linear(HEAD_DIM, HEAD_DIM, device="cuda")
    with torch.no_grad():
        proj.weight.normal_(0.0, HEAD_DIM**-0.5)
        proj.bias.normal_(0.0, 0.1)
    proj = proj.to(torch.bfloat16)

    sdpa_ms = bench_ms(lambda: sdpa_attention(q, k, v))
    report.add(Row("sla", "sdpa (baseline)", label, ms=sdpa_ms, gating=False))
    sdpa_graph_ms = graph_ms(lambda: sdpa_attention(q, k, v))
    report.add(Row("sla", "sdpa (baseline), CUDA graph replay", label, ms=sdpa_graph_ms, gating=False))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    for topk in TOPKS:
        name = f"topk {topk:.2f}"
        poison(nbytes(shape, torch.bfloat16))
        out = st.sla_triton(q, k, v, proj_l=proj, topk=topk)
        torch.cuda.synchronize()
        ref = sla_reference(q, k, v, proj_l=proj, topk=topk)
        total_ms = bench_ms(lambda: st.sla_triton(q, k, v, proj_l=proj, topk=topk))
        report.add(Row(
            "sla", f"{name} whole op vs sla_reference", label, ms=total_ms, baseline="sdpa",
            baseline_ms=sdpa_ms, rel_err=rel_err(out, ref), tol=1e-2,
            note=f"speedup {sdpa_ms / total_ms:.2f}x (target >= 6x)",
        ))
        del ref
        replay_ms = graph_ms(lambda: st.sla_triton(q, k, v, proj_l=proj, topk=topk))
        report.add(Row(
            "sla", f"{name} whole op, CUDA graph replay (as in the pipeline)", label, ms=replay_ms,
            baseline="sdpa graph replay", baseline_ms=sdpa_graph_ms, gating=False,
            note=f"speedup {sdpa_graph_ms / replay_ms:.2f}x (target >= 6x)",
        ))

        prep = st.sla_prepare(q, k, v, topk, with_linear=True)
        lut = prep.lut.view(1, HEADS, -1, prep.lut.shape[-1]).long()
        ref_lut = sla_block_map(qh, kh, topk).sort(dim=-1).values
        same_rows = float((lut == ref_lut).all(dim=-1).float().mean())
        same_lut_ref = sla_sparse_branch(qh, kh, vh, lut) + F.linear(
            sla_linear_branch(qh, kh, vh), proj.weight.float(), proj.bias.float()
        )
        report.add(Row(
            "sla", f"{name} kernel on our block map", label, rel_err=rel_err(out, same_lut_ref.transpose(1, 2)),
            tol=1e-2, note=f"block map rows equal to reference: {same_rows:.4f}",
            extra={"block_map_rows_equal": same_rows},
        ))
        del same_lut_ref
        map_ms = bench_ms(lambda: st.sla_prepare(q, k, v, topk, with_linear=False))
        prep_ms = bench_ms(lambda: st.sla_prepare(q, k, v, topk, with_linear=True))
        attend_ms = bench_ms(lambda: st.sla_attend(q, k, v, prep, proj.weight, proj.bias))
        report.add(Row("sla", f"{name} block map only", label, ms=map_ms, gating=False))
        _check_select(report, name, label, (q, k, v), topk, proj, sdpa_ms)
        if topk == 0.10:
            _check_prep_programs(report, name, label, (q, k, v), topk)
        report.add(Row("sla", f"{name} prep (block map + linear KV)", label, ms=prep_ms, gating=False))
        report.add(Row("sla", f"{name} attention kernel (sparse + linear + proj_l)", label, ms=attend_ms, gating=False))

    check_sagesla(report, q, k, v, proj, sdpa_ms, label)

    # topk 1.0 without proj_l is dense attention: the kernel must equal SDPA.
    small = (1, 4096 + 57, 4, HEAD_DIM)
    q, k, v = (torch.randn(small, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    poison(nbytes(small, torch.bfloat16))
    out = st.sla_triton(q, k, v, topk=1.0)
    report.add(Row("sla", "topk 1.0 no proj_l vs sdpa", "x".join(map(str, small)),
                   rel_err=rel_err(out, sdpa_attention(q.float(), k.float(), v.float())), tol=1e-2))
    report.rows[-1].extra["autotune"] = {
        "attn": {str(key): str(cfg) for key, cfg in getattr(st._sla_attn_kernel, "cache", {}).items()},
        "prep": {str(key): str(cfg) for key, cfg in getattr(st._sla_prep_kernel, "cache", {}).items()},
    }


def _check_select(report: Report, name: str, label: str, qkv, topk: float, proj, sdpa_ms: float) -> None:
    """The block selection alone, torch.topk + sort vs the fused kernel (TD_SLA_SELECT), and the whole op with
    the fused one."""
    import os

    from turbodiffusion_core.attention import sla_triton as st
    from turbodiffusion_core.attention.sla_reference import sla_topk_count

    q = qkv[0]
    heads, nq, nk = q.shape[0] * q.shape[2], math.ceil(q.shape[1] / 128), math.ceil(q.shape[1] / 64)
    scores = torch.randn(heads, nq, nk, device="cuda")
    keep = sla_topk_count(topk, nk)
    torch_ms = bench_ms(lambda: st.select_blocks(scores, keep, "torch"))
    fused_ms = bench_ms(lambda: st.select_blocks(scores, keep, "fused"))
    same = torch.equal(st.select_blocks(scores, keep, "fused"), st.select_blocks(scores, keep, "torch"))
    report.add(Row("sla", f"{name} block selection, fused kernel vs torch.topk + sort", f"{heads}x{nq}x{nk}",
                   ms=fused_ms, baseline="torch", baseline_ms=torch_ms, gating=True, ok=same,
                   note=f"same blocks: {same}"))
    old = os.environ.get(st.SELECT_ENV)
    os.environ[st.SELECT_ENV] = "fused"
    try:
        total_ms = bench_ms(lambda: st.sla_triton(*qkv, proj_l=proj, topk=topk))
    finally:
        if old is None:
            os.environ.pop(st.SELECT_ENV)
        else:
            os.environ[st.SELECT_ENV] = old
    report.add(Row("sla", f"{name} whole op with the fused selection", label, ms=total_ms, baseline="sdpa",
                   baseline_ms=sdpa_ms, gating=False, note=f"speedup {sdpa_ms / total_ms:.2f}x (target >= 6x)"))


def _check_prep_programs(report: Report, name: str, label: str, qkv, topk: float) -> None:
    """sla_prepare (with the linear branch) at several prep-kernel programs per SM (PREP_PROGRAMS_PER_SM)."""
    from turbodiffusion_core.attention import sla_triton as st

    default = st.PREP_PROGRAMS_PER_SM
    try:
        for programs in (2, 4, 8, 16, 32):
            st.PREP_PROGRAMS_PER_SM = programs
            st.sla_prepare(*qkv, topk, with_linear=True)  # autotune outside the timing
            ms = bench_ms(lambda: st.sla_prepare(*qkv, topk, with_linear=True))
            report.add(Row("sla", f"{name} prep, {programs} prep programs per SM", label, ms=ms, gating=False,
                           note="the default" if programs == default else ""))
    finally:
        st.PREP_PROGRAMS_PER_SM = default


def check_sagesla(report: Report, q, k, v, proj, sdpa_ms: float, label: str) -> None:
    """sagesla (SLA on SpargeAttn's INT8-QK / FP8-PV kernels) beside the same SDPA, when spas_sage_attn loads.

    At the GPU's own kernel blocks (64x128 on Hopper, as TurboDiffusion runs it) and, where those differ,
    at sla's 128x64 through SpargeAttn's mma.sync kernel; each against sla_reference at the same blocks.
    """
    import importlib.util

    from turbodiffusion_core.attention.sla_reference import sla_reference

    if importlib.util.find_spec("spas_sage_attn") is None:
        report.add(Row("sla", "sagesla skipped", label, gating=False,
                       note="spas_sage_attn is not installed (build it from SpargeAttn's source: README, attention backends)"))
        return
    from turbodiffusion_core.attention import sagesla as sg
    from turbodiffusion_core.attention import sla_triton as st

    error = sg.spas_import_error()
    if error is not None:
        report.add(Row("sla", "sagesla skipped", label, gating=False, note=f"spas_sage_attn fails to load: {error}"))
        return
    native = sg.native_blocks(q.device)
    for blocks in dict.fromkeys([native, sg.MMA_BLOCKS]):
        blkq, blkk = blocks
        for topk in TOPKS:
            name = f"sagesla {blkq}x{blkk} topk {topk:.2f}"
            run = lambda: sg.sagesla_attention(q, k, v, proj_l=proj, topk=topk, blocks=blocks)  # noqa: E731
            poison(nbytes(tuple(q.shape), torch.bfloat16))
            out = run()
            torch.cuda.synchronize()
            ref = sla_reference(q, k, v, proj_l=proj, topk=topk, blkq=blkq, blkk=blkk)
            total_ms = bench_ms(run)
            report.add(Row(
                "sla", f"{name} whole op vs sla_reference", label, ms=total_ms, baseline="sdpa",
                baseline_ms=sdpa_ms, rel_err=rel_err(out, ref), tol=5e-2,
                note=f"speedup {sdpa_ms / total_ms:.2f}x; INT8 q/k, FP8 v",
                extra={"blocks": list(blocks), "native": blocks == native},
            ))
            del out, ref
            if blocks == native:
                replay_ms = graph_ms(run)
                report.add(Row("sla", f"{name} whole op, CUDA graph replay (as in the pipeline)", label,
                               ms=replay_ms, baseline="sdpa", baseline_ms=sdpa_ms, gating=False,
                               note=f"speedup {sdpa_ms / replay_ms:.2f}x vs eager SDPA"))
            prep = st.sla_prepare(q, k, v, topk, with_linear=True, blkq=blkq, blkk=blkk)
            lut, valid = sg.spas_lut(prep.lut, q.shape[0], q.shape[2], math.ceil(q.shape[1] / blkk))
            prep_ms = bench_ms(lambda: st.sla_prepare(q, k, v, topk, with_linear=True, blkq=blkq, blkk=blkk))
            sparse_ms = bench_ms(lambda: sg.spas_sparse_branch(q, k, v, lut, valid, blocks))
            report.add(Row("sla", f"{name} prep (block map + linear KV)", label, ms=prep_ms, gating=False))
            report.add(Row("sla", f"{name} SpargeAttn part (quantize + kernel)", label, ms=sparse_ms,
                           gating=False))


# ---------------------------------------------------------------------------------------- quantized linears


def _w8a8_fp8_reference(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from turbodiffusion_core.quant.fp8 import dequantize_fp8_rowwise, quantize_fp8_rowwise

    xq, xs = quantize_fp8_rowwise(x)
    return dequantize_fp8_rowwise(xq, xs) @ dequantize_fp8_rowwise(wq, ws).t() + bias.float()


def check_quant(report: Report, rows: int) -> None:
    from turbodiffusion_core.quant import kernels as qk
    from turbodiffusion_core.quant import rowcol_kernels as rk
    from turbodiffusion_core.quant.fp8 import quantize_fp8_rowwise
    from turbodiffusion_core.quant.tile_int8 import quantize_tile_int8, w8a8_tile_reference

    for name, inner, outer in (("qkvo", DIM, DIM), ("ffn_up", DIM, FFN_DIM), ("ffn_down", FFN_DIM, DIM)):
        label = f"M{rows} K{inner} N{outer}"
        target = " (target >= 1.4x)" if name.startswith("ffn") else ""
        torch.manual_seed(1)
        x = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
        weight = (torch.randn(outer, inner, device="cuda") * 0.02).to(torch.bfloat16)
        bias = (torch.randn(outer, device="cuda") * 0.1).to(torch.bfloat16)
        dense = F.linear(x, weight, bias)
        bf16_ms = bench_ms(lambda: F.linear(x, weight, bias))
        report.add(Row("quant", f"{name} bf16 nn.Linear (baseline)", label, ms=bf16_ms, gating=False))

        # FP8: activation quantizer, then the whole linear.
        wq, ws = quantize_fp8_rowwise(weight)
        poison(nbytes((rows, inner), torch.float8_e4m3fn))
        xq, xs = qk.quantize_rows_fp8(x)
        rq, rs = quantize_fp8_rowwise(x)
        mismatch = float((xq.float() != rq.float()).float().mean())
        report.add(Row("quant", f"{name} fp8 row quantizer vs quantize_fp8_rowwise", label,
                       ms=bench_ms(lambda: qk.quantize_rows_fp8(x)), rel_err=mismatch, tol=1e-3,
                       note="err = fraction of e4m3 values that differ",
                       extra={"scale_rel_err": rel_err(xs.view(-1), rs)}))
        ref = _w8a8_fp8_reference(x, wq, ws, bias)
        for fast in (False, True):
            poison(nbytes((rows, outer), torch.bfloat16))
            out = qk.fp8_linear(x, wq, ws, bias, use_fast_accum=fast)
            ms = bench_ms(lambda: qk.fp8_linear(x, wq, ws, bias, use_fast_accum=fast))
            tag = "fast-accum" if fast else "exact-accum"
            report.add(Row("quant", f"{name} fp8_linear {tag} vs W8A8 reference", label, ms=ms, baseline="bf16",
                           baseline_ms=bf16_ms, rel_err=rel_err(out, ref), tol=1e-2,
                           note=f"speedup {bf16_ms / ms:.2f}x (target >= 1.4x)"))
            report.add(Row("quant", f"{name} fp8_linear {tag} vs bf16 linear", label, rel_err=rel_err(out, dense),
                           tol=3e-2, gating=False, note="quantization error itself (target < 3e-2)"))
        report.add(Row("quant", f"{name} fp8 GEMM alone (pre-quantized x)", label,
                       ms=bench_ms(lambda: qk.fp8_matmul(xq, xs, wq, ws, bias)), baseline="bf16",
                       baseline_ms=bf16_ms, gating=False))
        del ref, xq, rq

        # INT8 tile: quantizer, GEMM, whole linear.
        wq8, ws8 = quantize_tile_int8(weight)
        poison(nbytes((rows, inner), torch.int8))
        aq, as_ = qk.quantize_tiles_int8(x)
        rq8, rs8 = quantize_tile_int8(x)
        mismatch = float((aq != rq8).float().mean())
        report.add(Row("quant", f"{name} int8 tile quantizer vs quantize_tile_int8", label,
                       ms=bench_ms(lambda: qk.quantize_tiles_int8(x)), rel_err=mismatch, tol=1e-3,
                       note="err = fraction of int8 values that differ", extra={"scale_rel_err": rel_err(as_, rs8)}))
        ref8 = w8a8_tile_reference(x, wq8, ws8, bias)
        poison(nbytes((rows, outer), torch.bfloat16))
        out8 = qk.int8_tile_linear(x, wq8, ws8, bias)
        ms8 = bench_ms(lambda: qk.int8_tile_linear(x, wq8, ws8, bias))
        report.add(Row("quant", f"{name} int8_tile_linear vs w8a8_tile_reference", label, ms=ms8, baseline="bf16",
                       baseline_ms=bf16_ms, rel_err=rel_err(out8, ref8), tol=1e-2,
                       note=f"speedup {bf16_ms / ms8:.2f}x{target}"))
        report.add(Row("quant", f"{name} int8_tile_linear vs bf16 linear", label, rel_err=rel_err(out8, dense),
                       tol=3e-2, gating=False, note="quantization error itself (target < 3e-2)"))
        report.add(Row("quant", f"{name} int8 tile GEMM alone (pre-quantized x)", label,
                       ms=bench_ms(lambda: qk.int8_tile_matmul(aq, as_, wq8, ws8, bias)), baseline="bf16",
                       baseline_ms=bf16_ms, gating=False))
        del ref8, out8, aq, rq8
        torch.cuda.empty_cache()

        _check_rowcol(report, name, label, x, weight, bias, dense, bf16_ms, target, (wq8, ws8))
        del x, dense
        torch.cuda.empty_cache()

    _check_ffn(report, rows)
    kernels = {"int8_tile_gemm": qk._int8_tile_gemm_kernel, "int8_rowcol_gemm": rk._int8_rowcol_gemm_kernel,
               "int8_rowquant": rk._int8_rowquant_kernel}
    report.rows[-1].extra["autotune"] = {
        kname: {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
        for kname, kernel in kernels.items()
    }


def _check_rowcol(report: Report, name: str, label: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  dense: torch.Tensor, bf16_ms: float, target: str, tiles: tuple[torch.Tensor, torch.Tensor]) -> None:
    """INT8 per-channel ("rowcol", TD_INT8_KERNEL=rowcol): row quantizer, GEMM, whole linear. The weight is
    the `-quant` checkpoint's tiles re-quantized per channel, as `TileInt8Linear` does on the GPU."""
    from turbodiffusion_core.quant import rowcol_kernels as rk
    from turbodiffusion_core.quant.rowcol_int8 import (
        channel_int8_from_tiles,
        quantize_int8_rowwise,
        w8a8_rowcol_reference,
    )

    rows, inner = x.shape
    outer = weight.shape[0]
    wq, ws = channel_int8_from_tiles(*tiles)
    poison(nbytes((rows, inner), torch.int8))
    aq, as_ = rk.quantize_rows_int8(x)
    rq, rs = quantize_int8_rowwise(x)
    mismatch = float((aq != rq).float().mean())
    report.add(Row("quant", f"{name} int8 row quantizer vs quantize_int8_rowwise", label,
                   ms=bench_ms(lambda: rk.quantize_rows_int8(x)), rel_err=mismatch, tol=1e-3,
                   note="err = fraction of int8 values that differ", extra={"scale_rel_err": rel_err(as_, rs)}))
    del rq
    if name == "ffn_down":  # in the DiT this quantizer also applies the FFN's GELU
        report.add(Row("quant", f"{name} int8 row quantizer with GELU fused", label,
                       ms=bench_ms(lambda: rk.quantize_rows_int8(x, act="gelu_tanh")), gating=False))
    ref = w8a8_rowcol_reference(x, wq, ws, bias)
    poison(nbytes((rows, outer), torch.bfloat16))
    out = rk.int8_rowcol_linear(x, wq, ws, bias)
    ms = bench_ms(lambda: rk.int8_rowcol_linear(x, wq, ws, bias))
    report.add(Row("quant", f"{name} int8_rowcol_linear vs w8a8_rowcol_reference", label, ms=ms, baseline="bf16",
                   baseline_ms=bf16_ms, rel_err=rel_err(out, ref), tol=1e-2,
                   note=f"speedup {bf16_ms / ms:.2f}x{target}"))
    report.add(Row("quant", f"{name} int8_rowcol_linear vs bf16 linear", label, rel_err=rel_err(out, dense),
                   tol=3e-2, gating=False, note="quantization error itself (target < 3e-2); weight from tiles"))
    report.add(Row("quant", f"{name} int8 rowcol GEMM alone (pre-quantized x)", label,
                   ms=bench_ms(lambda: rk.int8_rowcol_matmul(aq, as_, wq, ws, bias)), baseline="bf16",
                   baseline_ms=bf16_ms, gating=False))
    del ref, out
    direct = rk.int8_rowcol_linear(x, *quantize_int8_rowwise(weight), bias)
    report.add(Row("quant", f"{name} int8_rowcol (bf16-quantized weight) vs bf16", label,
                   rel_err=rel_err(direct, dense), tol=3e-2, gating=False,
                   note="load-time quantization of a bf16 checkpoint: one weight rounding"))


def _check_ffn(report: Report, rows: int) -> None:
    """The whole FFN (up, GELU-tanh, down): bf16 vs FP8 with GELU fused into the down projection's quantizer."""
    from turbodiffusion_core.quant import kernels as qk
    from turbodiffusion_core.quant.fp8 import dequantize_fp8_rowwise, quantize_fp8_rowwise

    label = f"M{rows} {DIM}->{FFN_DIM}->{DIM}"
    torch.manual_seed(2)
    x = torch.randn(rows, DIM, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(FFN_DIM, DIM, device="cuda") * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(DIM, FFN_DIM, device="cuda") * 0.02).to(torch.bfloat16)
    b1 = (torch.randn(FFN_DIM, device="cuda") * 0.1).to(torch.bfloat16)
    b2 = (torch.randn(DIM, device="cuda") * 0.1).to(torch.bfloat16)
    (q1, s1), (q2, s2) = quantize_fp8_rowwise(w1), quantize_fp8_rowwise(w2)

    def bf16_ffn() -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    def fp8_ffn() -> torch.Tensor:
        return qk.fp8_linear(qk.fp8_linear(x, q1, s1, b1), q2, s2, b2, act="gelu_tanh")

    hidden = _w8a8_fp8_reference(x, q1, s1, b1).to(torch.bfloat16)
    gelu = F.gelu(hidden.float(), approximate="tanh")
    gq, gs = quantize_fp8_rowwise(gelu)
    ref = dequantize_fp8_rowwise(gq, gs) @ dequantize_fp8_rowwise(q2, s2).t() + b2.float()
    out = fp8_ffn()
    base_ms = bench_ms(bf16_ffn)
    ms = bench_ms(fp8_ffn)
    report.add(Row("quant", "ffn bf16 (baseline)", label, ms=base_ms, gating=False))
    report.add(Row("quant", "ffn fp8 (GELU fused into quantizer) vs W8A8 reference", label, ms=ms, baseline="bf16 ffn",
                   baseline_ms=base_ms, rel_err=rel_err(out, ref), tol=2e-2,
                   note=f"speedup {base_ms / ms:.2f}x (target >= 1.4x)"))
    report.add(Row("quant", "ffn fp8 vs bf16 ffn", label, rel_err=rel_err(out, bf16_ffn()), tol=3e-2, gating=False,
                   note="quantization error itself"))
    del hidden, gelu, gq, ref, out

    # INT8 rowcol, weights from -quant tiles re-quantized per channel (what TileInt8Linear runs on the GPU).
    from turbodiffusion_core.quant import rowcol_kernels as rk
    from turbodiffusion_core.quant.rowcol_int8 import channel_int8_from_tiles, w8a8_rowcol_reference
    from turbodiffusion_core.quant.tile_int8 import quantize_tile_int8

    (r1, t1), (r2, t2) = (channel_int8_from_tiles(*quantize_tile_int8(w)) for w in (w1, w2))

    def int8_ffn() -> torch.Tensor:
        return rk.int8_rowcol_linear(rk.int8_rowcol_linear(x, r1, t1, b1), r2, t2, b2, act="gelu_tanh")

    hidden = w8a8_rowcol_reference(x, r1, t1, b1)  # bf16, as the kernel's
    ref = w8a8_rowcol_reference(F.gelu(hidden.float(), approximate="tanh"), r2, t2, b2)
    del hidden
    out = int8_ffn()
    ms = bench_ms(int8_ffn)
    report.add(Row("quant", "ffn int8 rowcol (GELU fused) vs w8a8_rowcol_reference", label, ms=ms,
                   baseline="bf16 ffn", baseline_ms=base_ms, rel_err=rel_err(out, ref), tol=2e-2,
                   note=f"speedup {base_ms / ms:.2f}x (target >= 1.4x)"))
    report.add(Row("quant", "ffn int8 rowcol vs bf16 ffn", label, rel_err=rel_err(out, bf16_ffn()), tol=3e-2,
                   gating=False, note="quantization error itself (target < 3e-2)"))


# ----------------------------------------------------------------------------------------- fused elementwise


def check_fused(report: Report, tokens: int) -> None:
    from turbodiffusion_core.kernels import norm, rope

    label = f"1x{tokens}x{DIM}"
    torch.manual_seed(3)
    x = torch.randn(1, tokens, DIM, device="cuda")
    y = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(1, 6, DIM, device="cuda") * 0.5
    shift, scale, gate = table[:, 0:1], table[:, 1:2], table[:, 2:3]  # strided slices, as the DiT's chunk()
    weight, bias = torch.randn(DIM, device="cuda"), torch.randn(DIM, device="cuda")

    cases = [
        ("norm1: LN + modulation -> bf16", dict(y=None, shift=shift, scale=scale)),
        ("gated residual + norm3 (affine LN) -> bf16", dict(y=y, gate=gate, weight=weight, bias=bias)),
        ("residual + norm2 + modulation -> bf16", dict(y=y, shift=shift, scale=scale)),
        ("residual + norm2 + modulation -> fp8 + row scale",
         dict(y=y, shift=shift, scale=scale, out_dtype=torch.float8_e4m3fn)),
    ]
    for name, kwargs in cases:
        kwargs = dict(kwargs)
        y_arg = kwargs.pop("y")
        gate_arg = kwargs.pop("gate", None)
        out_dtype = kwargs.get("out_dtype", torch.bfloat16)
        poison(nbytes((tokens, DIM), out_dtype) + nbytes((tokens, DIM), torch.float32))
        x_new, h, h_scale = norm.residual_layernorm(x, y_arg, gate_arg, **kwargs)
        x_ref, h_ref, h_scale_ref = norm.residual_layernorm_reference(x, y_arg, gate_arg, **kwargs)
        if h_scale is not None:
            h, h_ref = h.float() * h_scale.view(1, -1, 1), h_ref.float() * h_scale_ref.view(1, -1, 1)
        ms = bench_ms(lambda: norm.residual_layernorm(x, y_arg, gate_arg, **kwargs))
        base = bench_ms(lambda: norm.residual_layernorm_reference(x, y_arg, gate_arg, **kwargs))
        report.add(Row("fused", name, label, ms=ms, baseline="unfused torch", baseline_ms=base,
                       rel_err=max(rel_err(h, h_ref), rel_err(x_new, x_ref)), tol=1e-2))

    poison(nbytes((tokens, DIM), torch.float32))
    out = norm.gated_residual(x, y, gate)
    report.add(Row("fused", "gated residual x + gate*y (fp32)", label,
                   ms=bench_ms(lambda: norm.gated_residual(x, y, gate)), baseline="torch.addcmul",
                   baseline_ms=bench_ms(lambda: torch.addcmul(x, y, gate)),
                   rel_err=rel_err(out, torch.addcmul(x, y, gate)), tol=1e-5))

    q = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
    wq, wk = torch.randn(DIM, device="cuda"), torch.randn(DIM, device="cuda")
    angles = torch.rand(tokens, 1, HEAD_DIM // 2, device="cuda") * 2 * math.pi
    rotations = torch.polar(torch.ones_like(angles), angles)
    poison(2 * nbytes((tokens, DIM), torch.bfloat16))
    qo, ko = rope.qk_norm_rope(q, k, wq, wk, rotations, num_heads=HEADS)
    qr, kr = rope.qk_norm_rope_reference(q, k, wq, wk, rotations, num_heads=HEADS)
    report.add(Row("fused", "q/k RMSNorm + 3D RoPE (both)", label,
                   ms=bench_ms(lambda: rope.qk_norm_rope(q, k, wq, wk, rotations, num_heads=HEADS)),
                   baseline="unfused torch",
                   baseline_ms=bench_ms(lambda: rope.qk_norm_rope_reference(q, k, wq, wk, rotations, num_heads=HEADS)),
                   rel_err=max(rel_err(qo, qr), rel_err(ko, kr)), tol=1e-2))


# ------------------------------------------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    header = (f"{'section':7} {'check':58} {'shape':24} {'ms':>9} {'base ms':>9} {'speedup':>8} "
              f"{'rel err':>9} {'tol':>8} status")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        status = "ok" if r.ok else ("FAIL" if r.gating else "over (info)")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r.section:7} {r.name[:58]:58} {r.shape[:24]:24} {fmt(r.ms, '9.3f')} {fmt(r.baseline_ms, '9.3f')} "
              f"{fmt(r.speedup, '8.2f')} {fmt(r.rel_err, '9.2e')} {fmt(r.tol, '8.0e')} {status}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    parser.add_argument("--only", default="sla,quant,fused", help="comma-separated sections to run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    tokens = TOKENS // 4 if args.quick else TOKENS
    sections = {"sla": lambda r: check_sla(r, tokens), "quant": lambda r: check_quant(r, tokens),
                "fused": lambda r: check_fused(r, tokens)}
    report = Report()
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        try:
            sections[name.strip()](report)
        except Exception as exc:  # report the crash, keep checking the other sections
            report.crashed(name, exc)
        torch.cuda.empty_cache()

    print_table(report.rows)
    props = torch.cuda.get_device_properties(0)
    result = {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tokens": tokens,
        "passed": not report.failed,
        "rows": [{**asdict(r), "speedup": r.speedup} for r in report.rows],
        "errors": report.errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}; {'all checks passed' if not report.failed else 'SOME CHECKS FAILED'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
