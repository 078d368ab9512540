#!/usr/bin/env bash
# Run the secure FedAvg app on a SuperLink and 3 SuperNodes on this machine,
# over TLS with SuperNode authentication, as a rehearsal of a multi-machine
# deployment. Arguments are run-config overrides, for example:
#   bash scripts/deploy_local.sh "num-server-rounds=2 dataset=digits"
# Environment: NUM_SUPERNODES (default 3); WORK_DIR (default: a new folder
# under ${TMPDIR:-/tmp}) receives the credentials, logs and results.json.
# Exits non-zero when the run does not complete. Every process it starts is
# stopped before it exits, also on Ctrl-C and SIGTERM.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"

PYTHON_BIN="$ROOT/.venv/bin/python"
NUM_SUPERNODES="${NUM_SUPERNODES:-3}"
WORK_DIR="${WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fedsec-deploy.XXXXXX")}"
CREDENTIALS_DIR="$WORK_DIR/credentials"
FEDERATION_DIR="$WORK_DIR/federation"

"$PYTHON_BIN" -m fedsec_flwr.deploy credentials --out "$CREDENTIALS_DIR" \
    --host 127.0.0.1 --host ::1 --host localhost --nodes "$NUM_SUPERNODES"

run_config=()
for overrides in "$@"; do
    run_config+=(--run-config "$overrides")
done

# The federation runs in the background so that this shell can pass SIGTERM
# on; run-local stops every process it started when it receives it.
cd "$ROOT"
"$PYTHON_BIN" -m fedsec_flwr.deploy run-local \
    --credentials "$CREDENTIALS_DIR" \
    --app "$ROOT/apps/secure_fedavg" \
    --nodes "$NUM_SUPERNODES" \
    --work-dir "$FEDERATION_DIR" \
    "${run_config[@]}" &
federation_pid=$!
trap 'kill -TERM "$federation_pid" 2>/dev/null || true' TERM INT HUP

status=0
wait "$federation_pid" || status=$?
# A trapped signal interrupts the first wait; the second one waits for the
# federation to finish stopping.
if kill -0 "$federation_pid" 2>/dev/null; then
    wait "$federation_pid" || status=$?
fi
trap - TERM INT HUP

echo "Credentials: $CREDENTIALS_DIR"
echo "Logs: $FEDERATION_DIR/logs (superlink.log, supernode-<i>.log, run-1.log)"
echo "Results: $FEDERATION_DIR/outputs/run-1/results.json"
if [ "$status" -ne 0 ]; then
    echo "The run did not complete (exit code $status)." >&2
fi
exit "$status"
