"""Start and stop a Flower federation over TLS on one machine.

`LocalFederation` runs the processes of a multi-machine deployment on
loopback. One ``flower-superlink`` runs with TLS and SuperNode
authentication, each of ``N`` ``flower-supernode`` processes authenticates
with its own key, and the ``flwr`` CLI uses a connection that trusts the
deployment's CA. The local deployment script, end-to-end tests and
benchmarks use it.

Every process is started in its own session, so it and the children it forks
form one process group. Stopping sends SIGTERM to each group and to every
descendant seen so far, then SIGKILL after a grace period, and reaps what
this process adopted. Flower 1.42 starts ``flower-superexec`` in a session of
its own, which is why descendants are tracked as well as groups.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedsec_flwr.launch import (
    become_subreaper,
    find_free_port,
    list_descendants,
    to_toml,
)

from .credentials import CredentialPaths

logger = logging.getLogger("fedsec_flwr.deploy")

CONNECTION_NAME = "fedsec-local"
LOOPBACK_HOST = "127.0.0.1"

RUN_STATUS_COMPLETED = "finished:completed"
RUN_STATUS_FINISHED_PREFIX = "finished"
NODE_STATUS_ONLINE = "online"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 124

DEFAULT_STARTUP_TIMEOUT_SECONDS = 120.0
DEFAULT_RUN_TIMEOUT_SECONDS = 3600.0
CLI_TIMEOUT_SECONDS = 60.0
PROBE_INTERVAL_SECONDS = 0.5
NODE_POLL_INTERVAL_SECONDS = 1.0
STATUS_POLL_INTERVAL_SECONDS = 1.0
FINAL_STATUS_TIMEOUT_SECONDS = 60.0
TERMINATE_GRACE_SECONDS = 10.0
KILL_GRACE_SECONDS = 5.0
RUN_ID_TIMEOUT_SECONDS = 120.0

_RUN_ID_PREFIX = "Successfully started run "


class DeploymentError(Exception):
    """A federation process failed to start, or a CLI call failed."""


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A process this module started, in a session and process group of its own.

    Attributes:
        name: Role of the process, such as ``superlink`` or ``supernode-0``.
        popen: The process handle.
        log_path: File that receives its standard output and error.
        descendants: PIDs of its children and their children seen so far.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    descendants: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """Process id, which is also its process-group id."""
        return self.popen.pid

    def is_running(self) -> bool:
        """Return whether the process has not exited yet."""
        return self.popen.poll() is None

    def record_descendants(self) -> None:
        """Add the PIDs of its current descendants to `descendants`."""
        for pid in list_descendants([self.pid]):
            if pid not in self.descendants:
                self.descendants.append(pid)

    def read_log(self) -> str:
        """Return the log written so far, or an empty string if there is none."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def find_executable(name: str) -> str:
    """Return the path of a console script, preferring this interpreter's environment.

    ``flower-superlink``, ``flower-supernode`` and ``flwr`` are installed next
    to the Python that runs this module, which need not be on ``PATH`` (a
    virtual environment that was not activated, for example).

    Raises:
        DeploymentError: If the program is found neither there nor on ``PATH``.
    """
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which(name)
    if on_path is None:
        raise DeploymentError(
            f"{name} not found next to {sys.executable} or on PATH. Install "
            "flwr 1.42 in this Python environment."
        )
    return on_path


def start_process(
    name: str, command: Sequence[str], *, env: Mapping[str, str], log_path: Path
) -> ManagedProcess:
    """Start ``command`` in a new session with its output in ``log_path``.

    The program ``command[0]`` is looked up with `find_executable`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    arguments = [find_executable(command[0]), *command[1:]]
    logger.debug("Starting %s: %s", name, " ".join(arguments))
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            arguments,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.info("Started %s (PID %d); log: %s", name, popen.pid, log_path)
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def kill_process(process: ManagedProcess) -> None:
    """Send SIGKILL to the process, its group and its known descendants."""
    process.record_descendants()
    _signal_group(process.pid, signal.SIGKILL)
    for pid in process.descendants:
        _signal_pid(pid, signal.SIGKILL)
    _wait_popen(process.popen, KILL_GRACE_SECONDS)
    _wait_gone(process.descendants, KILL_GRACE_SECONDS)
    logger.info("Killed %s (PID %d) with SIGKILL", process.name, process.pid)


def stop_processes(processes: Sequence[ManagedProcess]) -> list[int]:
    """Stop processes in the given order: SIGTERM, then SIGKILL after a grace.

    Each process gets SIGTERM to its group and a grace period to stop its own
    children. Then every descendant still alive gets SIGTERM, and whatever
    survives `KILL_GRACE_SECONDS` more gets SIGKILL. Adopted orphans are
    reaped.

    Returns:
        PIDs still alive after SIGKILL; normally none.
    """
    for process in processes:
        process.record_descendants()
    for process in processes:
        if process.is_running():
            _signal_group(process.pid, signal.SIGTERM)
            _wait_popen(process.popen, TERMINATE_GRACE_SECONDS)
            process.record_descendants()

    leftovers = _unique(
        [process.pid for process in processes if process.is_running()]
        + [pid for process in processes for pid in process.descendants]
    )
    survivors = stop_pids(leftovers)

    for process in processes:
        if process.is_running():
            process.popen.kill()
        _wait_popen(process.popen, KILL_GRACE_SECONDS)
    return survivors


def is_alive(pid: int) -> bool:
    """Return whether ``pid`` is a running process; reap it if it is our zombie."""
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text(
            encoding="utf-8", errors="replace"
        )
    except OSError:
        return False
    # The command name in parentheses may contain spaces, so the state is
    # the first field after the last ")".
    state = stat_text.rsplit(")", 1)[-1].split()[0]
    if state == "Z":
        _reap(pid)
        return False
    return True


def processes_mentioning(text: str) -> list[int]:
    """Return PIDs of live processes whose command line or environment has ``text``.

    Every Flower process of a federation has its ``FLWR_HOME`` under the
    federation's folder, so this also finds processes that left its process
    tree. A SuperNode that exits early leaves its ``flower-superexec`` behind
    in a session of its own until that process notices its parent is gone.
    The calling process is not listed.
    """
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob and is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_with_home_under(folder: Path) -> list[int]:
    """Return PIDs of live processes whose ``FLWR_HOME`` is ``folder`` or below it.

    Every Flower process of a federation has its ``FLWR_HOME`` under the
    federation's folder, so this finds those that left its process tree
    (see `processes_mentioning`). It compares whole paths, so a process
    whose ``FLWR_HOME`` only starts with the same text, or one that merely
    names the folder in its command line, such as ``timeout`` around the
    launcher or ``tail -f`` on a log, is not listed. Nor are the calling
    process and its ancestors.
    """
    folder = Path(os.path.abspath(folder))
    excluded = {os.getpid(), *_ancestor_pids()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in excluded:
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for variable in variables:
            if not variable.startswith(b"FLWR_HOME="):
                continue
            home = Path(os.path.abspath(os.fsdecode(variable[len(b"FLWR_HOME=") :])))
            if (home == folder or folder in home.parents) and is_alive(int(entry.name)):
                found.append(int(entry.name))
            break
    return found


def _ancestor_pids() -> list[int]:
    """Return the PIDs of the calling process's parent, its parent, and so on."""
    ancestors = []
    pid = os.getppid()
    while pid > 1 and pid not in ancestors:
        ancestors.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(
                encoding="utf-8", errors="replace"
            )
        except OSError:
            break
        # The command name may contain spaces and parentheses; the fields
        # after the last ")" are state, then the parent PID.
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return ancestors


def stop_pids(pids: Sequence[int]) -> list[int]:
    """Send SIGTERM to ``pids``, then SIGKILL after a grace period.

    Returns:
        PIDs still alive after SIGKILL.
    """
    for pid in pids:
        _signal_pid(pid, signal.SIGTERM)
    survivors = _wait_gone(pids, KILL_GRACE_SECONDS)
    for pid in survivors:
        _signal_pid(pid, signal.SIGKILL)
    return _wait_gone(survivors, KILL_GRACE_SECONDS)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _signal_pid(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _wait_popen(popen: subprocess.Popen[Any], timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=timeout)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if is_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if is_alive(pid)]
    return alive


def _reap(pid: int) -> None:
    # Only orphans adopted through the child-subreaper flag are reaped here;
    # each Popen object reaps its own child.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _unique(pids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(pids))


# --------------------------------------------------------------------------
# Layout and configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FederationPaths:
    """Files and folders of one local federation, all under ``work_dir``."""

    work_dir: Path

    @property
    def logs_dir(self) -> Path:
        """Folder with one log file per process and per run."""
        return self.work_dir / "logs"

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI; contains its ``config.toml``."""
        return self.work_dir / "cli-home"

    @property
    def superlink_home(self) -> Path:
        """``FLWR_HOME`` of the SuperLink; the ServerApp is installed here."""
        return self.work_dir / "superlink-home"

    @property
    def superlink_database(self) -> Path:
        """SQLite state of the SuperLink: nodes, runs and messages."""
        return self.work_dir / "superlink-state.db"

    @property
    def superlink_log(self) -> Path:
        """Output of ``flower-superlink``, including the ServerApp's errors."""
        return self.logs_dir / "superlink.log"

    @property
    def outputs_dir(self) -> Path:
        """Default ``output-dir`` of runs that do not set one."""
        return self.work_dir / "outputs"

    def supernode_home(self, name: str) -> Path:
        """``FLWR_HOME`` of one SuperNode, as on a machine of its own."""
        return self.work_dir / f"{name}-home"

    def supernode_log(self, name: str) -> Path:
        """Output of one ``flower-supernode``."""
        return self.logs_dir / f"{name}.log"

    def supernode_config(self, name: str) -> Path:
        """TOML file with one SuperNode's node config."""
        return self.logs_dir / f"{name}-node-config.toml"

    def run_log(self, label: str) -> Path:
        """Output of ``flwr run --stream`` for one run."""
        return self.logs_dir / f"run-{label}.log"

    def run_config_file(self, label: str) -> Path:
        """TOML file with one run's run-config overrides."""
        return self.logs_dir / f"run-{label}-config.toml"


def build_environment(base: Mapping[str, str], flwr_home: Path) -> dict[str, str]:
    """Return the environment of a Flower process with its own ``FLWR_HOME``."""
    env = dict(base)
    # Flower processes start further Flower console scripts (flower-superexec,
    # flwr-serverapp, flwr-clientapp), so this environment's bin folder must
    # come first on PATH even when it was never activated.
    scripts_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts_dir, env.get("PATH", os.defpath)])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NO_COLOR": "1",
            # Wide enough that the CLI's rich output does not wrap JSON lines.
            "COLUMNS": "200",
        }
    )
    return env


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with IPv6 hosts in brackets."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def write_cli_config(cli_home: Path, address: str, ca_cert: Path) -> Path:
    """Write the CLI's ``config.toml`` with one TLS connection as the default.

    Args:
        cli_home: ``FLWR_HOME`` of the CLI.
        address: ``host:port`` of the SuperLink.
        ca_cert: CA certificate that signed the SuperLink's certificate.

    Returns:
        Path of the written file.
    """
    cli_home.mkdir(parents=True, exist_ok=True)
    config_path = cli_home / "config.toml"
    text = (
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(ca_cert.resolve()))}\n"
    )
    config_path.write_text(text, encoding="utf-8")
    return config_path


def check_credentials(credentials: CredentialPaths) -> None:
    """Check that every file the federation reads exists.

    Raises:
        DeploymentError: Naming every missing file.
    """
    needed = [credentials.ca_cert, credentials.server_cert, credentials.server_key]
    for index in range(credentials.num_supernodes):
        needed += [
            credentials.supernode_key(index),
            credentials.supernode_public_key(index),
        ]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise DeploymentError(
            f"Credential files not found: {', '.join(missing)}. Create them with "
            "'python -m fedsec_flwr.deploy credentials --out DIR --nodes N "
            "--host 127.0.0.1'."
        )


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunResult:
    """Outcome of one run.

    Attributes:
        run_id: Flower run id, when the run was submitted.
        status: Final status reported by the SuperLink, such as
            ``finished:completed``; None if it could not be read.
        exit_code: 0 when the run completed, `EXIT_TIMEOUT` when it was
            stopped at its deadline, 1 otherwise.
        log_path: File with the streamed output of ``flwr run``.
        output_dir: ``output-dir`` run-config value the run was given.
    """

    run_id: int | None
    status: str | None
    exit_code: int
    log_path: Path
    output_dir: Path

    @property
    def succeeded(self) -> bool:
        """Whether the SuperLink reports the run as completed."""
        return self.exit_code == EXIT_OK


@dataclass
class SubmittedRun:
    """A run that the SuperLink accepted, with its ``flwr run --stream`` process.

    Attributes:
        run_id: Flower run id.
        stream: The ``flwr run --stream`` process, which exits when the run ends.
        output_dir: ``output-dir`` run-config value the run was given.
    """

    run_id: int
    stream: ManagedProcess
    output_dir: Path


def parse_run_status(output: str, run_id: int) -> str | None:
    """Return a run's status from ``flwr list --format json`` output."""
    document = _parse_json_output(output)
    for run in document.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            status = run.get("status")
            return status if isinstance(status, str) else None
    return None


def parse_node_statuses(output: str) -> dict[int, str]:
    """Return ``{node_id: status}`` from ``flwr supernode list --format json``."""
    document = _parse_json_output(output)
    statuses: dict[int, str] = {}
    for node in document.get("nodes", []):
        node_id = node.get("node-id")
        status = node.get("status")
        if node_id is not None and isinstance(status, str):
            statuses[int(node_id)] = status
    return statuses


def _parse_json_output(output: str) -> dict[str, Any]:
    # The CLI may print a banner or a connection line before the JSON object.
    start = output.find("{")
    if start < 0:
        return {}
    try:
        document = json.loads(output[start:])
    except json.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}


def _find_run_id(log_text: str) -> int | None:
    for line in log_text.splitlines():
        position = line.find(_RUN_ID_PREFIX)
        if position >= 0:
            digits = line[position + len(_RUN_ID_PREFIX) :].split()[0]
            if digits.isdigit():
                return int(digits)
    return None


# --------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------


class LocalFederation:
    """A SuperLink and N SuperNodes over TLS with SuperNode authentication.

    Use it as a context manager. Entering starts the SuperLink, registers
    every SuperNode public key and starts the SuperNodes. Leaving stops every
    process it started, also when the body raises. SuperNode ``i`` receives
    ``partition-id=i num-partitions=N`` as its node config, plus the
    ``node_config`` values given to every SuperNode.

    Starting makes this process a child subreaper (Linux), so orphaned
    Flower processes are re-parented here and can be reaped.

    Example::

        credentials = CredentialPaths(Path("creds"), num_supernodes=3)
        with LocalFederation(
            credentials=credentials, app_dir=Path("apps/secure_fedavg"),
            work_dir=Path("work"),
        ) as federation:
            result = federation.run({"num-server-rounds": 2})
    """

    def __init__(
        self,
        *,
        credentials: CredentialPaths,
        app_dir: Path,
        work_dir: Path,
        num_supernodes: int | None = None,
        host: str = LOOPBACK_HOST,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_SECONDS,
        base_env: Mapping[str, str] | None = None,
        node_config: Mapping[str, bool | int | float | str] | None = None,
    ) -> None:
        """Configure the federation; nothing starts until `start`.

        Args:
            credentials: Folder written by `create_credentials`.
            app_dir: Folder of the Flower app (contains its ``pyproject.toml``).
            work_dir: Folder for logs, state and each process's ``FLWR_HOME``.
            num_supernodes: SuperNodes to start; defaults to every key pair in
                ``credentials``.
            host: Loopback address the SuperLink listens on; it must be one
                of the server certificate's subject alternative names.
            startup_timeout: Seconds allowed for the SuperLink's health check
                to succeed and for every SuperNode to come online.
            base_env: Environment the processes inherit; ``os.environ`` by
                default.
            node_config: Node-config values that every SuperNode gets besides
                its ``partition-id`` and ``num-partitions``, such as the
                app's ``require-secure-aggregation``.

        Raises:
            DeploymentError: If an argument is invalid.
        """
        count = credentials.num_supernodes if num_supernodes is None else num_supernodes
        if count < 1 or count > credentials.num_supernodes:
            raise DeploymentError(
                "num_supernodes must be between 1 and the "
                f"{credentials.num_supernodes} key pairs in "
                f"{credentials.directory}. Found {count}."
            )
        if not (app_dir / "pyproject.toml").is_file():
            raise DeploymentError(
                f"app_dir must contain a pyproject.toml. Not found in {app_dir}."
            )
        if startup_timeout <= 0:
            raise DeploymentError(
                f"startup_timeout must be positive. Found {startup_timeout}."
            )
        extra_config = dict(node_config or {})
        reserved = sorted(set(extra_config) & {"partition-id", "num-partitions"})
        if reserved:
            raise DeploymentError(
                f"node_config must not set {', '.join(reserved)}, which the "
                "federation assigns to each SuperNode."
            )

        self.credentials = credentials
        self.app_dir = app_dir.resolve()
        self.paths = FederationPaths(work_dir.resolve())
        self.num_supernodes = count
        self.host = host
        self.startup_timeout = startup_timeout
        self.node_config = extra_config
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._base_env.pop("RAY_ADDRESS", None)

        self.port: int | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self.node_ids: dict[str, int] = {}
        self._runs: list[ManagedProcess] = []
        self._cli_processes: list[subprocess.Popen[str]] = []
        self._run_count = 0

    # ---- lifecycle -------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register the SuperNode keys, start the SuperNodes.

        Raises:
            DeploymentError: If a credential file is missing, a process exits
                during startup, or a SuperNode does not come online within
                ``startup_timeout`` seconds.
        """
        check_credentials(self.credentials)
        self.paths.logs_dir.mkdir(parents=True, exist_ok=True)
        become_subreaper()

        self.port = find_free_port()
        write_cli_config(self.paths.cli_home, self.address, self.credentials.ca_cert)
        self.superlink = self._start_superlink()
        self._wait_until_healthy()

        for index in range(self.num_supernodes):
            name = supernode_name(index)
            public_key = self.credentials.supernode_public_key(index)
            self.node_ids[name] = self.register_supernode(public_key, name=name)
        for index in range(self.num_supernodes):
            self.start_supernode(index)
        self.wait_for_online_supernodes(self.num_supernodes)

    def stop(self) -> None:
        """Stop every process this federation started, in reverse start order.

        Logs an error naming any PID that survives SIGKILL.
        """
        for process in self._cli_processes:
            if process.poll() is None:
                process.kill()
            _wait_popen(process, KILL_GRACE_SECONDS)
        order = [*self._runs, *self.supernodes.values()]
        if self.superlink is not None:
            order.append(self.superlink)
        survivors = stop_processes(order)
        # Processes that left the tree before their parent was stopped.
        strays = processes_with_home_under(self.paths.work_dir)
        if strays:
            logger.info("Stopping %d process(es) outside the tree", len(strays))
            survivors += stop_pids(strays)
        if survivors:
            logger.error("Processes still alive after SIGKILL: %s", survivors)
        elif order:
            logger.info("Stopped %d federation process(es)", len(order))

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink's HTTP API (Fleet, Control, Runtime)."""
        if self.port is None:
            raise DeploymentError("The federation has not been started.")
        return format_address(self.host, self.port)

    def started_pids(self) -> list[int]:
        """Return every PID this federation started or saw as a descendant."""
        processes = [*self._runs, *self.supernodes.values()]
        if self.superlink is not None:
            processes.append(self.superlink)
        pids: list[int] = []
        for process in processes:
            pids.append(process.pid)
            pids.extend(process.descendants)
        return _unique(pids)

    # ---- SuperLink -------------------------------------------------------

    def _start_superlink(self) -> ManagedProcess:
        command = [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(self.credentials.ca_cert),
            "--ssl-certfile",
            str(self.credentials.server_cert),
            "--ssl-keyfile",
            str(self.credentials.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--database",
            str(self.paths.superlink_database),
        ]
        env = build_environment(self._base_env, self.paths.superlink_home)
        return start_process(
            "superlink", command, env=env, log_path=self.paths.superlink_log
        )

    def _wait_until_healthy(self) -> None:
        assert self.superlink is not None
        url = f"https://{self.address}/health"
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.superlink.is_running():
                raise DeploymentError(
                    "flower-superlink exited with code "
                    f"{self.superlink.popen.returncode} during startup. See "
                    f"{self.paths.superlink_log}."
                )
            if _is_healthy(url, context):
                self.superlink.record_descendants()
                return
            time.sleep(PROBE_INTERVAL_SECONDS)
        raise DeploymentError(
            f"flower-superlink did not respond on {url} within "
            f"{self.startup_timeout:.0f} s. See {self.paths.superlink_log}."
        )

    # ---- SuperNodes ------------------------------------------------------

    def register_supernode(self, public_key: Path, *, name: str) -> int:
        """Register a SuperNode public key with the SuperLink.

        Args:
            public_key: ``ecdsa-sha2-nistp384`` public key file.
            name: Name shown by ``flwr supernode list``.

        Returns:
            The node id the SuperLink assigned.

        Raises:
            DeploymentError: If the CLI fails or prints no node id.
        """
        output = self.flwr_cli(
            "supernode",
            "register",
            str(public_key),
            CONNECTION_NAME,
            "--name",
            name,
            "--format",
            "json",
        )
        node_id = _parse_json_output(output).get("node-id")
        if node_id is None:
            raise DeploymentError(
                f"flwr supernode register returned no node id for {public_key}. "
                f"Output: {output.strip()}"
            )
        logger.info("Registered %s as node %s", name, node_id)
        return int(node_id)

    def start_supernode(
        self,
        index: int,
        *,
        private_key: Path | None = None,
        name: str | None = None,
    ) -> ManagedProcess:
        """Start one SuperNode with partition ``index`` of ``num_supernodes``.

        Args:
            index: Partition id, and the key pair used by default.
            private_key: OpenSSH private key to authenticate with, instead of
                ``supernode-<index>.key``; an unregistered key is rejected by
                the SuperLink.
            name: Name of the process and its log; ``supernode-<index>`` by
                default.

        Returns:
            The started process; it is stopped with the federation.
        """
        name = name or supernode_name(index)
        if name in self.supernodes and self.supernodes[name].is_running():
            raise DeploymentError(f"{name} is already running.")
        key = private_key or self.credentials.supernode_key(index)
        command = [
            "flower-supernode",
            "--root-certificates",
            str(self.credentials.ca_cert),
            "--superlink",
            self.address,
            "--auth-supernode-private-key",
            str(key),
            "--port",
            str(find_free_port()),
            "--node-config",
            str(self._write_node_config(name, index)),
        ]
        env = build_environment(self._base_env, self.paths.supernode_home(name))
        process = start_process(
            name, command, env=env, log_path=self.paths.supernode_log(name)
        )
        self.supernodes[name] = process
        return process

    def _write_node_config(self, name: str, index: int) -> Path:
        values = {
            "partition-id": index,
            "num-partitions": self.num_supernodes,
            **self.node_config,
        }
        path = self.paths.supernode_config(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(values), encoding="utf-8")
        return path

    def kill_supernode(self, index: int) -> None:
        """Kill SuperNode ``index`` and its ClientApp with SIGKILL, like a crash."""
        name = supernode_name(index)
        if name not in self.supernodes:
            raise DeploymentError(f"{name} was never started.")
        kill_process(self.supernodes[name])

    def supernode_statuses(self) -> dict[int, str]:
        """Return the SuperLink's ``{node_id: status}`` of registered nodes."""
        output = self.flwr_cli("supernode", "list", CONNECTION_NAME, "--format", "json")
        return parse_node_statuses(output)

    def wait_for_online_supernodes(self, count: int) -> None:
        """Wait until ``count`` registered SuperNodes are online.

        Raises:
            DeploymentError: If a SuperNode process exits, or fewer than
                ``count`` are online after ``startup_timeout`` seconds.
        """
        deadline = time.monotonic() + self.startup_timeout
        online = 0
        while time.monotonic() < deadline:
            self._check_supernodes_running()
            statuses = self.supernode_statuses()
            online = sum(status == NODE_STATUS_ONLINE for status in statuses.values())
            if online >= count:
                for process in self.supernodes.values():
                    process.record_descendants()
                logger.info("%d SuperNode(s) online", online)
                return
            time.sleep(NODE_POLL_INTERVAL_SECONDS)
        raise DeploymentError(
            f"Only {online} of {count} SuperNodes came online within "
            f"{self.startup_timeout:.0f} s. See the logs in {self.paths.logs_dir}."
        )

    def _check_supernodes_running(self) -> None:
        for name, process in self.supernodes.items():
            if not process.is_running():
                raise DeploymentError(
                    f"{name} exited with code {process.popen.returncode}. "
                    f"See {process.log_path}."
                )

    # ---- runs ------------------------------------------------------------

    def run(
        self,
        run_config: Mapping[str, bool | int | float | str] | None = None,
        *,
        timeout: float = DEFAULT_RUN_TIMEOUT_SECONDS,
    ) -> RunResult:
        """Run the app once and wait until the SuperLink reports it finished.

        ``flwr run`` exits 0 even when a run fails, so the result comes from
        the SuperLink's run status.

        Args:
            run_config: Run-config overrides. ``output-dir`` defaults to a
                folder under ``work_dir/outputs``.
            timeout: Seconds the run may take; then it is stopped with
                ``flwr stop`` and the result has exit code `EXIT_TIMEOUT`.

        Returns:
            The run's id, final status and exit code.
        """
        deadline = time.monotonic() + timeout
        submitted = self.submit_run(run_config)
        return self.wait_for_run(submitted, deadline)

    def submit_run(
        self, run_config: Mapping[str, bool | int | float | str] | None = None
    ) -> SubmittedRun:
        """Start ``flwr run --stream`` and return once the run has an id.

        Raises:
            DeploymentError: If ``flwr run`` exits or prints no run id within
                `RUN_ID_TIMEOUT_SECONDS`.
        """
        self._run_count += 1
        label = str(self._run_count)
        overrides = dict(run_config or {})
        overrides.setdefault("output-dir", str(self.paths.outputs_dir / f"run-{label}"))
        config_file = self.paths.run_config_file(label)
        config_file.write_text(to_toml(overrides), encoding="utf-8")

        command = [
            "flwr",
            "run",
            str(self.app_dir),
            CONNECTION_NAME,
            "--run-config",
            str(config_file),
            "--stream",
        ]
        env = build_environment(self._base_env, self.paths.cli_home)
        stream = start_process(
            f"flwr-run-{label}", command, env=env, log_path=self.paths.run_log(label)
        )
        self._runs.append(stream)
        return SubmittedRun(
            run_id=self._wait_for_run_id(stream),
            stream=stream,
            output_dir=Path(str(overrides["output-dir"])),
        )

    def _wait_for_run_id(self, stream: ManagedProcess) -> int:
        deadline = time.monotonic() + RUN_ID_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            run_id = _find_run_id(stream.read_log())
            if run_id is not None:
                logger.info("Started run %d; log: %s", run_id, stream.log_path)
                return run_id
            if not stream.is_running():
                break
            time.sleep(PROBE_INTERVAL_SECONDS)
        raise DeploymentError(
            f"flwr run printed no run id (exit code {stream.popen.poll()}). "
            f"See {stream.log_path}."
        )

    def wait_for_run(self, submitted: SubmittedRun, deadline: float) -> RunResult:
        """Wait for a submitted run to finish, or stop it at ``deadline``.

        Args:
            submitted: Value returned by `submit_run`.
            deadline: ``time.monotonic()`` value after which the run is stopped.

        Returns:
            The run's final status and exit code.
        """
        run_id = submitted.run_id
        try:
            submitted.stream.popen.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            logger.error("Run %d did not finish in time; stopping it", run_id)
            self._stop_run(run_id)
            return RunResult(
                run_id=run_id,
                status=self.run_status(run_id),
                exit_code=EXIT_TIMEOUT,
                log_path=submitted.stream.log_path,
                output_dir=submitted.output_dir,
            )

        status = self._wait_for_final_status(run_id)
        exit_code = EXIT_OK if status == RUN_STATUS_COMPLETED else EXIT_FAILED
        if exit_code != EXIT_OK:
            logger.error(
                "Run %d ended with status %s. See %s and %s.",
                run_id,
                status,
                submitted.stream.log_path,
                self.paths.superlink_log,
            )
        return RunResult(
            run_id=run_id,
            status=status,
            exit_code=exit_code,
            log_path=submitted.stream.log_path,
            output_dir=submitted.output_dir,
        )

    def _wait_for_final_status(self, run_id: int) -> str | None:
        # The log stream can end a moment before the SuperLink records the
        # final status, so the status is polled for a short while.
        deadline = time.monotonic() + FINAL_STATUS_TIMEOUT_SECONDS
        status = self.run_status(run_id)
        while (
            status is None or not status.startswith(RUN_STATUS_FINISHED_PREFIX)
        ) and time.monotonic() < deadline:
            time.sleep(STATUS_POLL_INTERVAL_SECONDS)
            status = self.run_status(run_id)
        return status

    def _stop_run(self, run_id: int) -> None:
        try:
            self.flwr_cli("stop", str(run_id), CONNECTION_NAME)
        except DeploymentError as error:
            logger.error("flwr stop failed for run %d: %s", run_id, error)

    def run_status(self, run_id: int) -> str | None:
        """Return the SuperLink's status of a run, or None if it is not known."""
        try:
            output = self.flwr_cli(
                "list", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"
            )
        except DeploymentError as error:
            logger.warning("Could not read the status of run %d: %s", run_id, error)
            return None
        return parse_run_status(output, run_id)

    def run_logs(self, run_id: int) -> str:
        """Return the ServerApp logs of a run that the SuperLink stored."""
        return self.flwr_cli("log", str(run_id), CONNECTION_NAME, "--show")

    # ---- CLI -------------------------------------------------------------

    def flwr_cli(self, *arguments: str) -> str:
        """Run the ``flwr`` CLI with this federation's ``FLWR_HOME``.

        Returns:
            Its standard output.

        Raises:
            DeploymentError: If it exits non-zero or takes longer than
                `CLI_TIMEOUT_SECONDS`.
        """
        command = [find_executable("flwr"), *arguments]
        env = build_environment(self._base_env, self.paths.cli_home)
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._cli_processes.append(process)
        try:
            stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as error:
            process.kill()
            process.communicate()
            raise DeploymentError(
                f"'{' '.join(command)}' timed out after {CLI_TIMEOUT_SECONDS:.0f} s."
            ) from error
        finally:
            self._cli_processes.remove(process)
        if process.returncode != 0:
            raise DeploymentError(
                f"'{' '.join(command)}' failed with exit code {process.returncode}: "
                f"{(stderr or stdout).strip()[-2000:]}"
            )
        return stdout


def supernode_name(index: int) -> str:
    """Return the process and log name of SuperNode ``index``."""
    return f"supernode-{index}"


def _is_healthy(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=context) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False
