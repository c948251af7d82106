#!/usr/bin/env bash
# runcache in front of a real MLflow server: the UI's hot reads (the 100-run search page, a
# 10,000-step metric history, runs/get) straight at MLflow and as runcache hits, under 8 and 64
# connections, as ratios in one run; then the CPU per hit of the search page gzipped (from the
# copy made once) against the same hit uncompressed. Loopback only. Prints Markdown tables.
#
#   bash bench/mlflow.sh                 # 2,000 runs seeded (~1.5 min), then ~3 min of load
#   bash bench/mlflow.sh --runs 500 --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null 2>&1 || { echo "bench/mlflow.sh: needs wrk (apt-get install -y wrk)" >&2; exit 1; }
VENV=$(bash scripts/mlflow-venv.sh | tail -n1)
export MLFLOW_VENV="$VENV"
echo "== cargo build --release (runcache) =="
cargo build --release --locked --bin runcache
exec python3 bench/mlflow.py "$@"
