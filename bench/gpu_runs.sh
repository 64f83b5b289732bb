#!/usr/bin/env bash
# The GPU measurements and GPU tests, one named step per call, each sized to finish in under 10 minutes
# on one H100 (sp: two or more GPUs). Results (JSON + log) go to OUT (default: $OUT, else /tmp/gpu_runs).
#
#   bash bench/gpu_runs.sh STEP [STEP ...]
#
#   kernels  GPU tests of every Triton kernel (SLA, int8 tile + rowcol, fp8, fused norms/RoPE, the fused DiT
#            block) and bench/check_kernels.py at the 1.3B 480p shapes                         (~5 min)
#   sagesla  with SpargeAttn's spas_sage_attn importable (installed beforehand in the same call, e.g. into
#            /tmp/site, as SpargeAttn's README says): its GPU tests and check_kernels.py --only sla
#            (sagesla rows beside sla)                                                           (~2 min)
#   dit      bench_dit.py, 1.3B 480p: diffusers vs original / sla x bf16 / fp8 (+CUDA graph) / int8-tile / int8-rowcol,
#            and sagesla when spas_sage_attn imports                                            (~3 min)
#   dit14b   bench_dit.py --configs "" --with-14b: the 14B DiT at 480p and 720p                 (~5 min)
#   e2e      bench_e2e.py --attention auto, the 1.3B T2V sections (request -> MP4, VAE, baseline)  (~1 min)
#   e2e14b   bench_e2e.py --only t2v_14b,i2v_a14b: 14B T2V 720p and the I2V A14B experts      (~7 min)
#   sp       bench_sp.py --counts 1,N for the GPUs present: 14B 720p sequence parallel          (~6 min)
#   profile  profile_gpu.py: kernel tables of one 1.3B forward (sla+fp8, and sagesla+fp8 when
#            spas_sage_attn imports) and one VAE decode; the decode with each tap mode (stacked, in_place,
#            concat), stacked up to 192 and 384 channels, and at 3 latent frames a pass (~3 min)
#   gemm     sweep_int8_gemm.py: the int8 GEMM's tiles vs bf16 / _int_mm / fp8 at the FFN shapes (~3 min)
#   mp4      request -> MP4 with the encoder on a thread, then on the helper process (TD_MP4_ENCODER), twice
#            each (bench_e2e.py --only build,warmup,e2e_t5_gpu), and mp4_tail.py on this machine's CPUs (~4 min)
#
# Python packages the GPU image lacks (diffusers, av, ftfy, pydantic, ...) are installed from .whl/ when
# that folder was carried (see README, "Benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n '2,26p' "$0"; exit 2; }
OUT_DIR=${OUT:-/tmp/gpu_runs}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

step() {
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee -a "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  return "$rc"
}

run_step() {
  case "$1" in
  kernels)
    # every CUDA test of these files (the CPU ones skip themselves; their interpreter run is CI's job)
    step kernels python3 -m pytest --noconftest -q -rfEs -k "not in_interpreter" tests/test_kernels_sla.py \
      tests/test_kernels_quant.py tests/test_kernels_int8_rowcol.py tests/test_kernels_fused.py \
      tests/test_dit_fused_gpu.py tests/test_vae_conformance.py
    step kernels python3 bench/check_kernels.py --out "$OUT_DIR/kernels_h100.json"
    ;;
  sagesla)
    if ! python3 -c "import spas_sage_attn" 2>/dev/null; then
      echo "sagesla: spas_sage_attn is not importable here; install SpargeAttn first (see its README)" >&2
      return 1
    fi
    step sagesla python3 -m pytest --noconftest -q -rfEs -s -k "not in_interpreter" tests/test_sagesla.py \
      tests/test_kernels_sage_inputs.py
    step sagesla python3 bench/check_kernels.py --only sla --out "$OUT_DIR/kernels_sla_h100.json"
    ;;
  dit)
    local configs="original,sla,sla+fp8,sla+fp8+graph,sla+int8-tile,sla+int8-rowcol,original+fp8"
    python3 -c "import spas_sage_attn" 2>/dev/null && configs="$configs,sagesla,sagesla+fp8,sagesla+fp8+graph"
    step dit python3 bench/bench_dit.py --configs "$configs" --out "$OUT_DIR/dit_h100.json"
    ;;
  dit14b)
    step dit14b python3 bench/bench_dit.py --configs "" --with-14b --configs-14b original,sla+fp8,sla+int8-rowcol \
      --out "$OUT_DIR/dit14b_h100.json"
    ;;
  e2e)
    step e2e python3 bench/bench_e2e.py --no-i2v --attention auto --requests 3 --budget-s 400 --out "$OUT_DIR/e2e_h100.json"
    ;;
  e2e14b)
    step e2e14b python3 bench/bench_e2e.py --only t2v_14b,i2v_a14b --budget-s 520 --out "$OUT_DIR/e2e14b_h100.json"
    ;;
  sp)
    local n
    n=$(python3 -c "import torch; print(torch.cuda.device_count())")
    step sp python3 bench/bench_sp.py --counts "1,$n" --out "$OUT_DIR/sp_h100.json"
    ;;
  profile)
    local dit="sla+fp8"
    python3 -c "import spas_sage_attn" 2>/dev/null && dit="$dit,sagesla+fp8"
    step profile python3 bench/profile_gpu.py --dit "$dit" --vae-variants stacked:96:1,in_place:96:1,concat:96:1,stacked:192:1,stacked:384:1,stacked:96:3 --out "$OUT_DIR/profile_h100.json"
    ;;
  gemm)
    step gemm python3 bench/sweep_int8_gemm.py --shapes ffn_up,ffn_down --budget-s 150 \
      --out "$OUT_DIR/int8_gemm_sweep_h100.json"
    ;;
  mp4)
    local encoder round
    for round in 1 2; do
      for encoder in thread process; do
        TD_MP4_ENCODER=$encoder step mp4 python3 bench/bench_e2e.py --no-i2v --attention sla \
          --only build,warmup,e2e_t5_gpu --requests 3 --budget-s 80 --out "$OUT_DIR/e2e_mp4_${encoder}_${round}_h100.json"
      done
    done
    step mp4 python3 bench/mp4_tail.py --params "" --encoders thread,process --main idle,busy \
      --out "$OUT_DIR/mp4_tail_h100.json"
    ;;
  *)
    echo "unknown step $1 (see the top of $0)" >&2
    return 2
    ;;
  esac
}

status=0
for name in "$@"; do
  run_step "$name" || status=1
done
exit $status
