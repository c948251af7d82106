#!/usr/bin/env bash
# A Python virtual environment with the real MLflow tracking server and client, for the
# MLflow tests (issue 22). Idempotent: does nothing when the venv already has mlflow 3.17.2.
#
#   bash scripts/mlflow-venv.sh            # venv at ${MLFLOW_VENV:-$HOME/.cache/runcache/mlflow-venv}
#   MLFLOW_VENV=/tmp/v bash scripts/mlflow-venv.sh
#
# The last line printed is the venv's path, so callers can do VENV=$(bash scripts/mlflow-venv.sh | tail -n1).
# 3.17.2 is pinned because its whole dependency set resolves from the package registry here
# (3.18.0 needs an mlflow-tracing release that does not).
set -euo pipefail

MLFLOW_VERSION=3.17.2
VENV="${MLFLOW_VENV:-$HOME/.cache/runcache/mlflow-venv}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/mlflow" ] && "$VENV/bin/mlflow" --version 2>/dev/null | grep -q "version ${MLFLOW_VERSION}\$"; then
    echo "mlflow-venv: $VENV already has mlflow $MLFLOW_VERSION; nothing to do" >&2
    echo "$VENV"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "mlflow-venv: creating a virtual environment at $VENV with $("$PYTHON" --version 2>&1)" >&2
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV"; then
        # Debian's python3 needs the python3-venv package for ensurepip.
        echo "mlflow-venv: '$PYTHON -m venv' failed; on Debian: apt-get install python3-venv" >&2
        rm -rf "$VENV"
        exit 1
    fi
else
    echo "mlflow-venv: reusing the virtual environment at $VENV" >&2
fi

echo "mlflow-venv: installing mlflow==$MLFLOW_VERSION (and requests) into $VENV" >&2
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "mlflow==${MLFLOW_VERSION}" requests

installed=$("$VENV/bin/mlflow" --version)
echo "mlflow-venv: $installed" >&2
case "$installed" in
    *"version ${MLFLOW_VERSION}") ;;
    *) echo "mlflow-venv: expected mlflow $MLFLOW_VERSION, got: $installed" >&2; exit 1 ;;
esac
echo "$VENV"
