#!/usr/bin/env bash
# runcache in front of a real MLflow tracking server, with the real MLflow client:
#
#   bash tests/mlflow/run.sh            # needs a built target/debug/runcache (cargo build)
#
# 1. a venv with mlflow 3.17.2 (scripts/mlflow-venv.sh; cached under ~/.cache between runs),
# 2. a real `mlflow server` (SQLite, artifacts over HTTP) and a redis-server on free ports,
# 3. two runcache instances with config/mlflow.toml in front of it, sharing that Redis,
# 4. tests/mlflow/client_check.py through instance A (each read after a write also through B,
#    and repeated reads must be cache hits), then the same script straight at MLflow: the two
#    normalised transcripts must be identical;
# 5. the real MLflow UI through A in headless Chromium (tests/mlflow/ui.mjs): the experiments
#    list, a runs table, a run's metric chart, and a metric logged after the page was cached
#    seen on reload. Screenshots (1280 px) go to $SCREENSHOT_DIR (default
#    /tmp/runcache-mlflow-screenshots); their paths are printed;
# 6. the consistency checker with this MLflow server as the origin (tests/checker/mlflow.rs):
#    concurrent writers and readers through two runcache instances of its own, on a Redis of its
#    own that the fault schedule kills, pauses and restarts; it prints reads, writes, faults and
#    violations, and fails on any violation (CHECKER_SECS and the other CHECKER_* variables
#    apply).
# Prints the figures and exits non-zero on any failure. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN="${RUNCACHE_BIN:-target/debug/runcache}"
[ -x "$BIN" ] || { echo "tests/mlflow/run.sh: $BIN is missing (cargo build first)" >&2; exit 1; }
# CI builds the venv from nothing (no cached venv, no pip cache); a local run reuses it.
if [ "${CI:-}" = true ] && [ -z "${MLFLOW_VENV:-}" ]; then
    MLFLOW_VENV="$(mktemp -d /tmp/runcache-mlflow-venv.XXXXXX)/venv"
    export MLFLOW_VENV PIP_NO_CACHE_DIR=1
fi
VENV=$(bash scripts/mlflow-venv.sh | tail -n1)
export MLFLOW_VENV="$VENV"
PY="$VENV/bin/python"

free_port() {
    python3 - <<'EOF'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 55535:
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 10000)); t.close(); print(p); break
        except OSError:
            t.close()
EOF
}

WORK=$(mktemp -d /tmp/runcache-mlflow.XXXXXX)
PIDS=()
MLFLOW_PID=
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "$MLFLOW_PID" ] && kill -- -"$MLFLOW_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ "${KEEP_WORK:-}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

MLFLOW_PORT=$(free_port)
REDIS_PORT=$(free_port)
A_PORT=$(free_port)
B_PORT=$(free_port)

echo "== redis-server on $REDIS_PORT, mlflow server on $MLFLOW_PORT =="
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=($!)
started=$(date +%s)
# TZ=UTC: its log's times are UTC, which the checker matches its reads against.
MLFLOW_PID=$(TZ=UTC bash tests/mlflow/start_mlflow.sh "$MLFLOW_PORT" "$WORK/mlflow" | tail -n1)
echo "mlflow answered /health after $(( $(date +%s) - started )) s"

start_runcache() {
    local port=$1 name=$2
    RUNCACHE_CONFIG=config/mlflow.toml \
    RUNCACHE__SERVER__ADDR="127.0.0.1:$port" \
    RUNCACHE__ORIGIN__BASE_URL="http://127.0.0.1:$MLFLOW_PORT" \
    RUNCACHE__REDIS__URL="redis://127.0.0.1:$REDIS_PORT" \
    RUNCACHE__CACHE__PREFIX="mlflow-test" \
    RUNCACHE__ADMIN__TOKEN="mlflow-test-admin-token" \
    RUNCACHE__JOURNAL__PATH="$WORK/journal-$name.log" \
    RUST_LOG="${RUST_LOG:-warn}" \
        "$BIN" > "$WORK/runcache-$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$port/_runcache/ready" >/dev/null && return 0
        sleep 0.1
    done
    echo "runcache $name did not become ready; its log:" >&2
    cat "$WORK/runcache-$name.log" >&2
    return 1
}
start_runcache "$A_PORT" a
start_runcache "$B_PORT" b
echo "== runcache a on $A_PORT, b on $B_PORT (config/mlflow.toml) =="

echo "== the real client through runcache (reads after each write through a and b) =="
"$PY" tests/mlflow/client_check.py --uri "http://127.0.0.1:$A_PORT" \
    --second-uri "http://127.0.0.1:$B_PORT" --expect-hits --out "$WORK/gateway.json"
echo "== the same client straight at MLflow =="
"$PY" tests/mlflow/client_check.py --uri "http://127.0.0.1:$MLFLOW_PORT" --out "$WORK/direct.json"

python3 - "$WORK/direct.json" "$WORK/gateway.json" <<'EOF'
import json, sys
direct, gateway = (json.load(open(p)) for p in sys.argv[1:])
if direct["transcript"] != gateway["transcript"]:
    for i, (a, b) in enumerate(zip(direct["transcript"], gateway["transcript"])):
        if a != b:
            print(f"first difference at step {i}:\n direct:  {a}\n gateway: {b}")
            break
    sys.exit("the transcripts through runcache and straight at MLflow differ")
summary = gateway.get("cache_summary", {})
print("identical transcripts:", len(direct["transcript"]), "steps")
print("cache through runcache:", json.dumps(summary, sort_keys=True))
EOF
echo "== the real MLflow UI through runcache (headless Chromium) =="
SHOTS="${SCREENSHOT_DIR:-/tmp/runcache-mlflow-screenshots}"
mkdir -p "$SHOTS"
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi
GATEWAY_URL="http://127.0.0.1:$A_PORT" SCREENSHOT_DIR="$SHOTS" node tests/mlflow/ui.mjs
curl -s -H "Authorization: Bearer mlflow-test-admin-token" "http://127.0.0.1:$A_PORT/_runcache/cache/stats" \
    | python3 -c 'import json,sys; s=json.load(sys.stdin)["stats"]; print("instance a:", {k: s[k] for k in ("hits","misses","bypasses","invalidations","origin_fetches")})'
echo "== the consistency checker with MLflow as the origin (faults from the schedule) =="
CHECKER_MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT" CHECKER_MLFLOW_LOG="$WORK/mlflow/server.log" \
    cargo test --locked --test checker mlflow_consistency_under_faults -- --ignored --nocapture
echo "== tests/mlflow/run.sh: passed =="
