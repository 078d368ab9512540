#!/usr/bin/env bash
# Set up the environment, then run the secure FedAvg app on the simulation
# engine. Extra arguments go to the launcher, for example:
#   bash scripts/run.sh --run-config "dataset=digits num-server-rounds=10"
# Exits non-zero when the run does not complete.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"

cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m fedsec_flwr.launch "$ROOT/apps/secure_fedavg" "$@"
