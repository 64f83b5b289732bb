#!/usr/bin/env bash
# Set up everything the tests need and run them:   scripts/test.sh [pytest args]
# Needs python3 and a redis-server binary (tests start their own on a free port when 127.0.0.1:6379 is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
