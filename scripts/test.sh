#!/usr/bin/env bash
# The test suite on a fresh machine: installs whatever the tests need and is missing
# (redis-server, docker-compose, prometheus-client, chromium, node, npm, playwright-core),
# then runs `cargo test --locked` with the arguments given (and, given none, runcache in front
# of a real MLflow server: tests/mlflow/run.sh):
#
#   bash scripts/test.sh                         # everything
#   bash scripts/test.sh --test api fallback     # one test binary, one filter
#
# Non-interactive; Debian packages through apt-get, as root or through sudo. Runs from any
# directory. The tests start their own redis-server processes and never touch the one on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        echo "scripts/test.sh: installing needs root or sudo: $*" >&2
        return 1
    fi
}

# NEEDRESTART_SUSPEND: installing never restarts the machine's services (Debian's needrestart).
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y "$@" </dev/null
}

echo "== redis-server (if missing) =="
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
fi

echo "== docker-compose (if missing; its config command needs no engine) =="
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    # Without its recommended Docker engine: the tests run only `config`.
    apt_install --no-install-recommends docker-compose
fi

echo "== python3 and prometheus-client (if missing; the tests parse /metrics with it) =="
if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3
fi
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    # --break-system-packages: Debian 12 marks its python as externally managed (PEP 668).
    pip_args=(--quiet --disable-pip-version-check)
    if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
        pip_args+=(--break-system-packages)
    fi
    if [ "$(id -u)" -eq 0 ]; then
        pip_args+=(--root-user-action=ignore)
    else
        pip_args+=(--user)
    fi
    python3 -m pip install "${pip_args[@]}" prometheus-client==0.26.0 </dev/null
fi

echo "== chromium, node and npm (if missing; the dashboard's browser test) =="
pkgs=()
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
if [ "${#pkgs[@]}" -gt 0 ]; then
    apt_install "${pkgs[@]}"
fi

echo "== playwright-core (if missing; pinned by tests/browser/package-lock.json, no browser downloaded) =="
if ! [ -d tests/browser/node_modules/playwright-core ]; then
    (cd tests/browser && npm ci --no-audit --no-fund </dev/null)
fi

echo "== tool versions =="
redis-server --version
if [ -x /usr/bin/chromium ]; then /usr/bin/chromium --version 2>/dev/null || true; fi
node --version

echo "== cargo test --locked $* =="
cargo test --locked "$@"

# The whole suite (no arguments) ends with runcache in front of a real MLflow server: the real
# client through two instances and straight at MLflow, then the real UI in Chromium
# (tests/mlflow/run.sh; its venv is built once, under ~/.cache/runcache).
if [ $# -eq 0 ]; then
    echo "== tests/mlflow/run.sh (a real MLflow server, its client and UI) =="
    bash tests/mlflow/run.sh
fi
