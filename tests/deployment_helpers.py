"""Helpers for the deployment tests: logs, results files, processes, Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedsec_flwr.deploy.local import (
    ManagedProcess,
    build_environment,
    start_process,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"

# flwr 1.42 SuperNode log lines: a "[RUN <id>, ROUND <n>]" header precedes
# each "Receiving: train message" line.
_ROUND_HEADER = re.compile(r"\[RUN \d+, ROUND (\d+)\]")
_RECEIVED_TRAIN = "Receiving: train message"
# Ray prints this line once the head node accepts connections.
_RAY_STARTED = "Ray runtime started"


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.5
) -> bool:
    """Poll ``condition`` until it holds; return whether it did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def received_train_messages(log_text: str, server_round: int) -> int:
    """Count the train messages a SuperNode received in ``server_round``."""
    current_round = None
    count = 0
    for line in log_text.splitlines():
        header = _ROUND_HEADER.search(line)
        if header:
            current_round = int(header.group(1))
        elif _RECEIVED_TRAIN in line and current_round == server_round:
            count += 1
    return count


def read_results(output_dir: Path) -> dict[str, Any]:
    """Load ``results.json`` from a run's output folder."""
    document: dict[str, Any] = json.loads(
        (output_dir / "results.json").read_text(encoding="utf-8")
    )
    return document


def find_free_port() -> int:
    """Return a loopback TCP port that was free when checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_simulation(
    output_dir: Path,
    run_config: Mapping[str, bool | int | float | str],
    *,
    num_supernodes: int,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """Run the app on the simulation engine through ``fedsec_flwr.launch``."""
    overrides = []
    for key, value in run_config.items():
        overrides += ["--run-config", f"{key}={format_override(value)}"]
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        *overrides,
        "--num-supernodes",
        str(num_supernodes),
        "--output-dir",
        str(output_dir),
        "--timeout",
        str(timeout),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        stdout, _ = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, "")


def format_override(value: bool | int | float | str) -> str:
    """Format one run-config value for a ``--run-config 'k=v ...'`` argument."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A TOML basic string: the launcher keeps a quoted value a string.
        return json.dumps(value)
    return repr(value)


def start_ray_head(temp_dir: Path, log_path: Path) -> tuple[ManagedProcess, str]:
    """Start a one-machine Ray head node as a stand-in for a cluster.

    ``ray start --block`` keeps every Ray process in its process group, so the
    cluster is stopped by PID; ``ray stop`` would stop every Ray process on
    the machine. Every port is picked free.

    Returns:
        The ``ray start`` process and the cluster address ``127.0.0.1:PORT``.
    """
    port = find_free_port()
    worker_ports = ",".join(str(find_free_port()) for _ in range(8))
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--temp-dir",
        str(temp_dir),
        "--include-dashboard",
        "false",
        "--dashboard-port",
        str(find_free_port()),
        "--ray-client-server-port",
        str(find_free_port()),
        "--node-manager-port",
        str(find_free_port()),
        "--object-manager-port",
        str(find_free_port()),
        "--dashboard-agent-listen-port",
        str(find_free_port()),
        "--dashboard-agent-grpc-port",
        str(find_free_port()),
        "--metrics-export-port",
        str(find_free_port()),
        "--runtime-env-agent-port",
        str(find_free_port()),
        "--worker-port-list",
        worker_ports,
        "--object-store-memory",
        str(200 * 1024 * 1024),
    ]
    process = start_process(
        "ray-head", command, env=ray_environment(), log_path=log_path
    )
    return process, f"127.0.0.1:{port}"


def ray_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an environment that keeps a one-machine Ray cluster on loopback."""
    env = dict(os.environ if base is None else base)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # On Linux Ray replaces 127.0.0.1 by the machine's outward address so
    # other machines can join; this switch keeps the stand-in on loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def ray_head_started(process: ManagedProcess) -> bool:
    """Return whether the Ray head has printed its start-up confirmation."""
    return _RAY_STARTED in process.read_log()


def start_simulation_superlink(
    work_dir: Path, *, ray_address: str
) -> tuple[ManagedProcess, int]:
    """Start a simulation SuperLink whose simulations join an existing Ray cluster."""
    port = find_free_port()
    env = build_environment(ray_environment(), work_dir / "superlink-home")
    env["RAY_ADDRESS"] = ray_address
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(work_dir / "superlink-state.db"),
        "--disable-runtime-dependency-installation",
    ]
    process = start_process(
        "simulation-superlink", command, env=env, log_path=work_dir / "superlink.log"
    )
    return process, port


def superlink_answers(port: int) -> bool:
    """Return whether a plain-HTTP SuperLink's ``/health`` endpoint returns 2xx."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/health", timeout=2.0
        ) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def write_insecure_connection(cli_home: Path, name: str, port: int) -> None:
    """Write a CLI ``config.toml`` whose default is a plain-HTTP loopback SuperLink."""
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
