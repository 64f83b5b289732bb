#!/usr/bin/env bash
# Set up and start the server:   scripts/serve.sh [turbodiffusion serve args, e.g. --port 8000 --model tiny-t2v]
# One process: the API, an embedded Redis and one worker. Without a GPU or downloaded weights it serves the
# tiny random-weight model so the whole API works anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
. .venv/bin/activate
exec turbodiffusion serve "$@"
