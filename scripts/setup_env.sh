#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
#   EXTRAS=test  scripts/setup_env.sh     also install the test dependencies
# Torch: the CPU build 2.13.0 where the package index has it (fast, small), else the default build.
# Set TD_TORCH_SPEC (for example "torch==2.11.0") to choose another, e.g. a CUDA build on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch"
  python -m pip install -q "${TD_TORCH_SPEC:-torch==2.13.0}" || python -m pip install -q torch
fi
extras=${EXTRAS:-}
target="."
[ -n "$extras" ] && target=".[${extras}]"
echo "[setup] installing the project ${target}"
python -m pip install -q -e "$target"
