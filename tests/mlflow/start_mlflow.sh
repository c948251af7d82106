#!/usr/bin/env bash
# Starts a real MLflow tracking server (from scripts/mlflow-venv.sh's venv) in the background
# and waits until it answers GET /health. Prints the server's pid on the last line of stdout.
#
#   PID=$(bash tests/mlflow/start_mlflow.sh 5123 /tmp/mlf | tail -n1)
#   ...
#   kill -- -"$PID"      # the server runs in its own session: its pid is its process group,
#                        # which also holds its uvicorn worker(s); a plain `kill "$PID"` works too
#                        # (mlflow forwards SIGTERM to uvicorn)
#
# Arguments: PORT DATA_DIR [extra `mlflow server` options...]
# DATA_DIR gets mlf.db (SQLite backend store), artifacts/ (served through HTTP with
# --serve-artifacts, so clients upload and download via /api/2.0/mlflow-artifacts/...) and
# server.log. Environment: MLFLOW_VENV (the venv; default as in scripts/mlflow-venv.sh),
# MLFLOW_WORKERS (default 1), MLFLOW_START_TIMEOUT (seconds, default 120),
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (default false here: when on, 3.17 starts a job runner and
# seven huey consumer processes for GenAI jobs, which the tracking API does not need).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 PORT DATA_DIR [mlflow server options...]" >&2
    exit 2
fi
PORT=$1
DATA=$2
shift 2
VENV="${MLFLOW_VENV:-$HOME/.cache/runcache/mlflow-venv}"
WORKERS="${MLFLOW_WORKERS:-1}"
TIMEOUT="${MLFLOW_START_TIMEOUT:-120}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [ ! -x "$VENV/bin/mlflow" ]; then
    echo "start_mlflow: no mlflow in $VENV; run scripts/mlflow-venv.sh first" >&2
    exit 1
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "start_mlflow: something already listens on 127.0.0.1:$PORT" >&2
    exit 1
fi

mkdir -p "$DATA/artifacts"
DATA=$(cd "$DATA" && pwd)
LOG="$DATA/server.log"
echo "start_mlflow: mlflow server on 127.0.0.1:$PORT, store sqlite:///$DATA/mlf.db, artifacts $DATA/artifacts, log $LOG" >&2

start=$(date +%s.%N)
# setsid: the server and its workers get their own process group, so the caller can end them
# all by that group without touching anything else. Started from the data dir, so nothing
# lands in the caller's working directory. stdin closed: the server never reads it.
(
    cd "$DATA"
    exec setsid "$VENV/bin/mlflow" server \
        --backend-store-uri "sqlite:///$DATA/mlf.db" \
        --serve-artifacts --artifacts-destination "$DATA/artifacts" \
        --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" "$@" \
        </dev/null >>"$LOG" 2>&1
) &
PID=$!

deadline=$(( $(date +%s) + TIMEOUT ))
until curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "start_mlflow: the server exited before answering /health; last lines of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "start_mlflow: no answer on /health after ${TIMEOUT}s; stopping pid $PID; last lines of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        kill -- -"$PID" 2>/dev/null || kill "$PID" 2>/dev/null || true
        exit 1
    fi
    sleep 0.25
done
echo "start_mlflow: healthy after $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')s, pid $PID" >&2
echo "$PID"
