#!/usr/bin/env bash
# Set up everything the tests need and run them:   scripts/test.sh [pytest args]
# Needs python3 and a redis-server binary on the PATH: the tests start their own Redis on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup_env.sh
. .venv/bin/activate
# Several test processes (API server, workers) run models at once on few cores: one math thread each
# avoids the thread oversubscription that makes CPU kernels tens of times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q "$@"
