#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv.
#
# Idempotent: pip runs only when the environment is new or when a file that
# defines the dependencies changed since the last successful install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
# The CPU build; an unpinned torch resolves to a multi-gigabyte CUDA build.
TORCH_SPEC="torch==2.13.0"
STAMP="$VENV/.setup-stamp"

if [ ! -x "$VENV/bin/python" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "setup: $PYTHON not found. Install Python 3.11 or set PYTHON=/path/to/python3.11." >&2
        exit 1
    fi
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

wanted_stamp="$(
    {
        echo "$TORCH_SPEC"
        cat "$ROOT/pyproject.toml" "$ROOT/apps/secure_fedavg/pyproject.toml"
    } | sha256sum | cut -d' ' -f1
)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted_stamp" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing $TORCH_SPEC and fedsec_flwr[dev] into $VENV"
"$VENV/bin/python" -m pip install "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -e "$ROOT[dev]" "$TORCH_SPEC"
echo "$wanted_stamp" >"$STAMP"
echo "setup: done"
