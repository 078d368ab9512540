#!/usr/bin/env bash
# Set up the environment, then run the linters, the type checker and every
# test, the end-to-end and deployment tests included. Extra arguments go to
# pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASHION_MNIST_FILE="/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
cd "$ROOT"

if [ ! -f "$FASHION_MNIST_FILE" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "test: installing the Debian package dataset-fashion-mnist"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
    else
        echo "test: $FASHION_MNIST_FILE is missing and this user is not root;" \
            "the Fashion-MNIST tests will be skipped." \
            "Install it with: sudo apt-get install -y dataset-fashion-mnist" >&2
    fi
fi

echo "test: ruff check"
ruff check .
echo "test: ruff format --check"
ruff format --check .
echo "test: mypy"
mypy

echo "test: pytest"
status=0
pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
