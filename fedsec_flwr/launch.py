"""Run a Flower app on the simulation engine and report whether it succeeded.

``flwr run`` (flwr 1.42) exits 0 even when the run fails, and with the default
local connection it starts a detached SuperLink that outlives it. This
launcher closes both gaps, and checks the run config first:

- it rejects run-config keys that the app does not declare, and calls the
  app's own run-config check (``check-run-config`` in
  ``[tool.fedsec_flwr.launch]`` of its ``pyproject.toml``) before any
  process starts;
- it starts its own SuperLink, on free loopback ports and in a private
  ``FLWR_HOME`` under the output folder, so concurrent runs never share state;
- it streams the run's logs to the terminal and to ``<output-dir>/logs``;
- it reads the run's final status from the SuperLink (``flwr list``) and the
  ``status`` field of ``<output-dir>/results.json``;
- it always stops the SuperLink and every process below it (SuperExec, the
  simulation, Ray), also on timeout, on errors and on Ctrl-C.

The exit status is 0 only when the run finished as ``completed`` and
``results.json`` records ``completed``.

Usage::

    python -m fedsec_flwr.launch apps/secure_fedavg --num-supernodes 10
    python -m fedsec_flwr.launch apps/secure_fedavg --run-config "dataset=digits"
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedsec_flwr import app_check
from fedsec_flwr.core.errors import shortened
from fedsec_flwr.files import os_reason

logger = logging.getLogger("fedsec_flwr.launch")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

RUN_STATUS_COMPLETED = "finished:completed"
RUN_STATUS_FINISHED_PREFIX = "finished"
RESULTS_STATUS_RUNNING = "running"
RESULTS_STATUS_COMPLETED = "completed"
RESULTS_STATUS_FAILED = "failed"
RESULTS_FILENAME = "results.json"
PREVIOUS_RESULTS_FILENAME = "results.previous.json"

DEFAULT_NUM_SUPERNODES = 10
DEFAULT_CLIENT_CPUS = 1
DEFAULT_TIMEOUT_SECONDS = 3600.0
MAX_ERROR_LENGTH = 2000
"""Characters of an error message that the launcher prints; a run-config
value of any length can appear in one."""
DEFAULT_OUTPUT_ROOT = "runs"

SUPERLINK_STARTUP_TIMEOUT_SECONDS = 60.0
SUPERLINK_PROBE_INTERVAL_SECONDS = 0.25
STATUS_POLL_INTERVAL_SECONDS = 2.0
STATUS_POLL_TIMEOUT_SECONDS = 60.0
STATUS_QUERY_TIMEOUT_SECONDS = 30.0
COMPLETION_GRACE_SECONDS = 30.0
"""Seconds that a run whose results.json records "completed" may take after
the timeout to end, before the launcher stops it."""
TERMINATE_GRACE_SECONDS = 10.0
KILL_GRACE_SECONDS = 5.0

# Linux prctl option: orphaned descendants are re-parented to this process
# instead of PID 1, so Ray processes left behind by the simulation can still be
# found through the process tree and stopped.
_PR_SET_CHILD_SUBREAPER = 36

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

_RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")
_LOOPBACK = "127.0.0.1"

OUTPUT_DIR_KEY = "output-dir"
"""Run-config key that the launcher always sets to its output folder."""

CHECK_RUN_CONFIG_KEY = "check-run-config"
"""Key of ``[tool.fedsec_flwr.launch]`` that names the app's run-config check."""

APP_CHECK_TIMEOUT_SECONDS = 120.0
"""Seconds the app's run-config check may take, imports included."""

_CHECK_SPEC_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class LaunchError(Exception):
    """A run could not be started, or ended without success."""


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """Options of one launch: the app, its run config and the output folder.

    Attributes:
        app_dir: Folder of the Flower app (contains its ``pyproject.toml``).
        run_config: Run-config overrides, by kebab-case key.
        output_dir: Folder for ``results.json``, logs and the private
            ``FLWR_HOME``; passed to the app as ``output-dir``.
        num_supernodes: Number of simulated SuperNodes (clients).
        client_cpus: CPUs Ray reserves per simulated client.
        timeout: Seconds the whole run may take before it is stopped.
    """

    app_dir: Path
    run_config: Mapping[str, bool | int | float | str]
    output_dir: Path
    num_supernodes: int = DEFAULT_NUM_SUPERNODES
    client_cpus: int = DEFAULT_CLIENT_CPUS
    timeout: float = DEFAULT_TIMEOUT_SECONDS


@dataclass
class LaunchResult:
    """Outcome of one launch.

    Attributes:
        exit_code: Process exit status the launcher returns.
        run_id: Flower run id, when the run started.
        run_status: Final status reported by the SuperLink, such as
            ``finished:completed``.
        results_status: ``status`` field of ``results.json``, if readable.
        message: One-line summary for the user.
    """

    exit_code: int
    run_id: int | None = None
    run_status: str | None = None
    results_status: str | None = None
    message: str = ""


@dataclass(frozen=True)
class RunPaths:
    """Files and folders of one launch, all under the output folder."""

    output_dir: Path

    @property
    def flwr_home(self) -> Path:
        """Private ``FLWR_HOME`` of this launch."""
        return self.output_dir / "flwr-home"

    @property
    def logs_dir(self) -> Path:
        """Folder with the SuperLink and run logs."""
        return self.output_dir / "logs"

    @property
    def superlink_log(self) -> Path:
        """SuperLink log file, which also contains the simulation's errors."""
        return self.logs_dir / "superlink.log"

    @property
    def superlink_console_log(self) -> Path:
        """Standard output and error of the SuperLink process."""
        return self.logs_dir / "superlink-console.log"

    @property
    def run_log(self) -> Path:
        """Output of ``flwr run --stream``: the run's streamed logs."""
        return self.logs_dir / "run.log"

    @property
    def run_config_file(self) -> Path:
        """TOML file with the run-config overrides passed to ``flwr run``."""
        return self.logs_dir / "run-config.toml"

    @property
    def launch_info(self) -> Path:
        """JSON file with the SuperLink's PID and ports, for debugging and tests."""
        return self.logs_dir / "launch.json"

    @property
    def results_file(self) -> Path:
        """``results.json`` written by the app."""
        return self.output_dir / RESULTS_FILENAME

    @property
    def previous_results_file(self) -> Path:
        """Earlier launch's ``results.json``, moved aside when a new launch starts."""
        return self.output_dir / PREVIOUS_RESULTS_FILENAME


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the private SuperLink."""

    http_api: int
    control_api: int


@dataclass
class _ProcessGroup:
    """Processes this launch started, for cleanup."""

    superlink: subprocess.Popen[bytes] | None = None
    flwr_run: subprocess.Popen[str] | None = None
    preexisting_children: set[int] = field(default_factory=set)


# --------------------------------------------------------------------------
# Run config parsing
# --------------------------------------------------------------------------


def parse_run_config(
    items: Sequence[str] | None, *, option: str = "--run-config"
) -> dict[str, bool | int | float | str]:
    """Parse ``key=value`` pairs, as written on the command line.

    Each item may contain several space-separated pairs. A value is read as
    a TOML bool, integer, float or quoted string. Any other value is taken as
    a plain string, so ``dataset=digits`` works without quotes. ``option``
    names the command-line option in error messages.

    Raises:
        LaunchError: If a pair has no ``=`` or an empty key.
    """
    overrides: dict[str, bool | int | float | str] = {}
    for item in items or []:
        for pair in _split_pairs(item, option):
            key, separator, raw_value = pair.partition("=")
            if not separator or not key:
                raise LaunchError(
                    f"{option} entries must have the form key=value. Found {pair!r}."
                )
            overrides[key] = _parse_value(raw_value)
    return overrides


def _split_pairs(text: str, option: str) -> list[str]:
    # Split on whitespace outside quotes and keep the quotes, so that a quoted
    # value such as name="7" stays a string instead of becoming an integer.
    pairs: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for char in text:
        if quote is None and char.isspace():
            if current:
                pairs.append("".join(current))
                current = []
            continue
        if quote is None and char in "'\"":
            quote = char
        elif char == quote:
            quote = None
        current.append(char)

    if quote is not None:
        raise LaunchError(f"{option} has an unclosed {quote} quote in {text!r}.")
    if current:
        pairs.append("".join(current))
    return pairs


def _parse_value(raw_value: str) -> bool | int | float | str:
    try:
        parsed = tomllib.loads(f"value = {raw_value}")["value"]
    except tomllib.TOMLDecodeError:
        return raw_value
    if isinstance(parsed, bool | int | float | str):
        return parsed
    return raw_value


def to_toml(values: Mapping[str, bool | int | float | str]) -> str:
    """Serialize flat run-config values as a TOML document."""
    lines = []
    for key, value in values.items():
        lines.append(f"{toml_string(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
"""Short escapes of TOML basic strings."""


def toml_string(text: str) -> str:
    """Quote ``text`` as a TOML basic string.

    Characters outside ASCII are written as they are, because TOML files are
    UTF-8 and its escapes cannot express a surrogate pair. Control characters
    and DEL are escaped.

    Raises:
        ValueError: If ``text`` contains a lone surrogate, which no UTF-8 file
            can hold.
    """
    parts = []
    for character in text:
        code = ord(character)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(
                f"Run config text must be valid Unicode. Found the lone surrogate "
                f"U+{code:04X} in {text!r}."
            )
        if character in TOML_ESCAPES:
            parts.append(TOML_ESCAPES[character])
        elif code < 0x20 or code == 0x7F:
            parts.append(f"\\u{code:04X}")
        else:
            parts.append(character)
    return '"' + "".join(parts) + '"'


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return toml_string(value)


def read_app_config_keys(app_dir: Path) -> set[str]:
    """Return the run-config keys that the app's ``pyproject.toml`` declares.

    Raises:
        LaunchError: If the file is missing or has no ``[tool.flwr.app]``.
    """
    return set(read_app_defaults(app_dir))


def read_app_defaults(app_dir: Path) -> dict[str, Any]:
    """Return the run config that ``[tool.flwr.app.config]`` declares.

    Raises:
        LaunchError: If the file is missing or has no ``[tool.flwr.app]``.
    """
    pyproject, document = _read_pyproject(app_dir)
    try:
        app_section = document["tool"]["flwr"]["app"]
    except KeyError as error:
        raise LaunchError(
            f"{pyproject} must contain a [tool.flwr.app] section."
        ) from error
    return dict(app_section.get("config", {}))


def read_run_config_check(app_dir: Path) -> str | None:
    """Return the app's run-config check, ``"module:function"``, if it names one.

    The check is the ``check-run-config`` key of ``[tool.fedsec_flwr.launch]``
    in the app's ``pyproject.toml``.

    Raises:
        LaunchError: If the value is not of the form ``module:function``.
    """
    pyproject, document = _read_pyproject(app_dir)
    section = document.get("tool", {}).get("fedsec_flwr", {}).get("launch", {})
    spec = section.get(CHECK_RUN_CONFIG_KEY)
    if spec is None:
        return None
    if not isinstance(spec, str) or not _CHECK_SPEC_PATTERN.fullmatch(spec):
        raise LaunchError(
            f"{CHECK_RUN_CONFIG_KEY} in {pyproject} must have the form "
            f"'package.module:function'. Found {spec!r}."
        )
    return spec


def check_run_config_values(
    app_dir: Path,
    spec: str,
    run_config: Mapping[str, Any],
    num_supernodes: int | None = None,
) -> None:
    """Run the app's run-config check before any process of the run starts.

    The check runs in a child process (``fedsec_flwr.app_check``), which
    imports the function from ``app_dir`` and calls it with the whole run
    config: the declared defaults with the overrides applied. The app's
    imports therefore change nothing in the launcher, such as environment
    variables that the SuperLink would inherit. It catches values that the
    ServerApp would reject only after the SuperLink and the simulation have
    started. A check that takes a ``num_nodes`` keyword receives
    ``num_supernodes``.

    Raises:
        LaunchError: If the function rejects the run config (``ValueError``;
            the message is the function's), or the check itself fails.
    """
    with tempfile.TemporaryDirectory(prefix="fedsec-check-") as folder:
        result_file = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "fedsec_flwr.app_check",
            spec,
            str(app_dir),
            str(result_file),
        ]
        if num_supernodes is not None:
            command.append(str(num_supernodes))
        try:
            completed = subprocess.run(
                command,
                input=json.dumps(dict(run_config)),
                text=True,
                timeout=APP_CHECK_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"The app's {CHECK_RUN_CONFIG_KEY} {spec!r} did not finish within "
                f"{APP_CHECK_TIMEOUT_SECONDS:.0f} s."
            ) from None
        outcome = _read_check_outcome(result_file)

    if outcome is None:
        raise LaunchError(
            f"The app's {CHECK_RUN_CONFIG_KEY} {spec!r} ended without a result "
            f"(exit status {completed.returncode}); its output is above."
        )
    status, message = outcome
    if status == app_check.STATUS_REJECTED:
        raise LaunchError(message)
    if status != app_check.STATUS_ACCEPTED:
        raise LaunchError(
            f"The app's {CHECK_RUN_CONFIG_KEY} {spec!r} failed: {message}."
        )


def _read_check_outcome(result_file: Path) -> tuple[str, str] | None:
    try:
        document = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    status = document.get("status")
    message = document.get("message")
    if not isinstance(status, str) or not isinstance(message, str):
        return None
    return status, message


def _read_pyproject(app_dir: Path) -> tuple[Path, dict[str, Any]]:
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise LaunchError(
            f"APP_DIR must contain a pyproject.toml. Not found: {pyproject}."
        )
    with pyproject.open("rb") as stream:
        return pyproject, tomllib.load(stream)


def check_run_config_keys(
    overrides: Mapping[str, object], known_keys: set[str], app_dir: Path
) -> None:
    """Reject run-config keys that the app does not declare.

    Raises:
        LaunchError: Naming every unknown key and the declared ones.
    """
    if OUTPUT_DIR_KEY not in known_keys:
        raise LaunchError(
            f"The app in {app_dir} must declare {OUTPUT_DIR_KEY} in "
            "[tool.flwr.app.config]: the launcher passes its output folder "
            "in that key."
        )
    unknown = sorted(set(overrides) - known_keys)
    if unknown:
        raise LaunchError(
            f"Unknown run-config key(s) {', '.join(unknown)} for the app in "
            f"{app_dir}. Declared keys: {', '.join(sorted(known_keys))}."
        )


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def flower_command(name: str) -> str:
    """Return the path of a Flower command, preferring this interpreter's scripts.

    Raises:
        LaunchError: If the command is found neither there nor on PATH.
    """
    beside_interpreter = Path(sys.executable).parent / name
    if beside_interpreter.is_file() and os.access(beside_interpreter, os.X_OK):
        return str(beside_interpreter)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(
            f"Command {name!r} not found next to {sys.executable} or on PATH. "
            "Install flwr[simulation] (bash scripts/setup.sh)."
        )
    return found


def find_free_port() -> int:
    """Return a loopback TCP port that was free when checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def pick_ports() -> Ports:
    """Pick two distinct free loopback ports."""
    http_api = find_free_port()
    control_api = find_free_port()
    while control_api == http_api:
        control_api = find_free_port()
    return Ports(http_api=http_api, control_api=control_api)


def build_environment(
    base: Mapping[str, str], paths: RunPaths, ports: Ports, ray_temp_dir: Path
) -> dict[str, str]:
    """Return the environment of every Flower process of this launch.

    ``ray_temp_dir`` becomes ``RAY_TMPDIR``: Ray's ``ray.init()`` joins the
    cluster recorded in ``<RAY_TMPDIR>/ray/ray_current_cluster`` when one
    exists (Ray 2.55), so a private folder keeps the simulation off any
    cluster started with ``ray start`` on the same host.
    """
    env = dict(base)
    # SuperLink and SuperExec start further Flower commands by name, so the
    # folder of this interpreter's scripts goes first on PATH. A virtual
    # environment then works without being activated.
    scripts_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts_dir, base.get("PATH", os.defpath)])
    env.update(
        {
            "FLWR_HOME": str(paths.flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports.http_api),
            "FLWR_LOCAL_CONTROL_API_PORT": str(ports.control_api),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(ray_temp_dir),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    # An inherited RAY_ADDRESS would attach the simulation to another cluster.
    env.pop("RAY_ADDRESS", None)
    return env


def write_flower_config(flwr_home: Path) -> Path:
    """Write a ``config.toml`` whose default connection is the local SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    config_path = flwr_home / "config.toml"
    config_path.write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        encoding="utf-8",
    )
    return config_path


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only); return whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def start_superlink(
    paths: RunPaths, ports: Ports, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start a simulation-mode SuperLink on ``ports.http_api``.

    The flags match the SuperLink that ``flwr run`` would start for a
    ``:local:`` connection, plus ``--disable-runtime-dependency-installation``.
    """
    command = [
        flower_command("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        _LOOPBACK,
        "--port",
        str(ports.http_api),
        "--database",
        str(paths.flwr_home / "state.db"),
        "--log-file",
        str(paths.superlink_log),
        "--disable-runtime-dependency-installation",
    ]
    console = paths.superlink_console_log.open("ab")
    try:
        # A new session keeps a terminal's Ctrl-C away from the SuperLink, so
        # the launcher decides the shutdown order.
        return subprocess.Popen(
            command,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as error:
        raise LaunchError(f"Failed to start {command[0]}: {error}.") from error
    finally:
        console.close()


def write_launch_info(paths: RunPaths, ports: Ports, superlink_pid: int) -> None:
    """Record the SuperLink's PID, ports and FLWR_HOME in ``logs/launch.json``."""
    info = {
        "launcher_pid": os.getpid(),
        "superlink_pid": superlink_pid,
        "http_api_port": ports.http_api,
        "control_api_port": ports.control_api,
        "flwr_home": str(paths.flwr_home),
        "superlink_log": str(paths.superlink_log),
        "run_log": str(paths.run_log),
    }
    paths.launch_info.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def wait_until_healthy(
    process: subprocess.Popen[bytes], port: int, paths: RunPaths, timeout: float
) -> None:
    """Poll the SuperLink's ``/health`` endpoint until it responds.

    Raises:
        LaunchError: If the process exits or the endpoint does not respond
            within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    url = f"http://{_LOOPBACK}:{port}/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(
                f"flower-superlink exited with code {process.returncode} during "
                f"startup. See {paths.superlink_log} and "
                f"{paths.superlink_console_log}."
            )
        if _is_healthy(url):
            return
        time.sleep(SUPERLINK_PROBE_INTERVAL_SECONDS)
    raise LaunchError(
        f"flower-superlink did not respond on {url} within {timeout:.0f} s. "
        f"See {paths.superlink_log}."
    )


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError):
        return False


def list_descendants(
    root_pids: Sequence[int], parents: Mapping[int, int] | None = None
) -> list[int]:
    """Return the PIDs of all descendants of ``root_pids`` (Linux /proc).

    Args:
        root_pids: Processes whose descendants are listed; they are not
            included themselves.
        parents: Parent PID by PID; read from /proc when omitted.
    """
    if parents is None:
        parents = _read_parent_pids()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)

    found: list[int] = []
    pending = list(root_pids)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def _child_pids() -> list[int]:
    own_pid = os.getpid()
    return [pid for pid, parent in _read_parent_pids().items() if parent == own_pid]


def _read_parent_pids() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # The command name is in parentheses and may itself contain spaces or
        # parentheses, so the fields are read after the last ")".
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 2:
            parents[int(entry.name)] = int(fields[1])
    return parents


def is_port_listening(port: int) -> bool:
    """Return whether any process listens on TCP ``port`` (Linux /proc/net)."""
    listen_state = "0A"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            local_port = int(columns[1].rsplit(":", 1)[1], 16)
            if local_port == port and columns[3] == listen_state:
                return True
    return False


def stop_process_tree(group: _ProcessGroup) -> list[int]:
    """Stop the SuperLink, ``flwr run`` and all their descendants.

    The SuperLink gets SIGTERM first so it can stop SuperExec itself. Every
    process of the tree still alive after that gets SIGTERM, then SIGKILL.
    The tree is read again between the steps, because processes whose
    parent exits are adopted by this process (see `become_subreaper`).

    Returns:
        PIDs that survived SIGKILL (normally none).
    """
    if group.flwr_run is not None and group.flwr_run.poll() is None:
        _signal(group.flwr_run.pid, signal.SIGTERM)
    if group.superlink is not None and group.superlink.poll() is None:
        _signal(group.superlink.pid, signal.SIGTERM)
        _wait_popen(group.superlink, TERMINATE_GRACE_SECONDS)

    # Only processes that are in the tree right now are signalled, so a PID
    # that was reused by an unrelated process is never hit.
    tree = _launch_tree(group)
    for pid in tree:
        _signal(pid, signal.SIGTERM)
    _wait_gone(tree, KILL_GRACE_SECONDS)

    tree = _launch_tree(group)
    for pid in tree:
        if _is_alive(pid):
            _signal(pid, signal.SIGKILL)
    survivors = _wait_gone(tree, KILL_GRACE_SECONDS)

    for own in (group.superlink, group.flwr_run):
        if own is not None and own.poll() is None:
            own.kill()
            _wait_popen(own, KILL_GRACE_SECONDS)
    _reap_until_gone(_launch_tree(group), KILL_GRACE_SECONDS)
    return survivors


def _launch_tree(group: _ProcessGroup) -> list[int]:
    # Every child of this process that existed before the launch is excluded,
    # so a caller's own subprocesses are left alone.
    parents = _read_parent_pids()
    own_pid = os.getpid()
    children = [
        pid
        for pid, parent in parents.items()
        if parent == own_pid and pid not in group.preexisting_children
    ]
    return _merge(children, list_descendants(children, parents))


def _merge(first: Sequence[int], second: Sequence[int]) -> list[int]:
    merged = list(first)
    merged.extend(pid for pid in second if pid not in merged)
    return merged


def _reap_until_gone(pids: Sequence[int], timeout: float) -> None:
    # An adopted process that exits stays a zombie until this process reaps
    # it. Unreaped, it would pass to PID 1 when the launcher exits.
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        _reap(remaining)
        remaining = [pid for pid in remaining if _is_own_zombie_or_alive(pid)]
        if remaining:
            time.sleep(0.1)


def _is_own_zombie_or_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] != "Z":
        return True
    return int(fields[1]) == os.getpid()


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _wait_popen(process: subprocess.Popen[Any], timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def _is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state == "Z":
        _reap([pid])
        return False
    return True


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _is_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _is_alive(pid)]
    return alive


def _reap(pids: Sequence[int]) -> None:
    # Only adopted orphans are reaped here; Popen objects reap their own child.
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def start_flwr_run(
    options: LaunchOptions, paths: RunPaths, env: Mapping[str, str]
) -> subprocess.Popen[str]:
    """Start ``flwr run --stream`` on the app with the launch's overrides."""
    federation_config = (
        f"num-supernodes={options.num_supernodes} "
        f"client-resources-num-cpus={options.client_cpus}"
    )
    command = [
        flower_command("flwr"),
        "run",
        str(options.app_dir),
        "--run-config",
        str(paths.run_config_file),
        "--federation-config",
        federation_config,
        "--stream",
    ]
    return subprocess.Popen(
        command,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )


class _LogPump(threading.Thread):
    """Copy a process's output to the terminal and a log file, line by line."""

    def __init__(self, source: IO[str], log_path: Path, echo: IO[str]) -> None:
        super().__init__(daemon=True)
        self._source = source
        self._log_path = log_path
        self._echo = echo
        self.run_id: int | None = None

    def run(self) -> None:
        with self._log_path.open("a", encoding="utf-8") as log_file:
            for line in self._source:
                log_file.write(line)
                log_file.flush()
                self._echo.write(line)
                self._echo.flush()
                match = _RUN_ID_PATTERN.search(line)
                if match and self.run_id is None:
                    self.run_id = int(match.group(1))


def query_run_status(run_id: int, env: Mapping[str, str]) -> str | None:
    """Return the SuperLink's status string of ``run_id``, or None if unknown."""
    command = [
        flower_command("flwr"),
        "list",
        "--run-id",
        str(run_id),
        "--format",
        "json",
    ]
    try:
        completed = subprocess.run(
            command,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=STATUS_QUERY_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        logger.warning("flwr list timed out after %.0f s", STATUS_QUERY_TIMEOUT_SECONDS)
        return None
    return _parse_run_status(completed.stdout, run_id)


def _parse_run_status(output: str, run_id: int) -> str | None:
    start = output.find("{")
    if start < 0:
        return None
    try:
        document = json.loads(output[start:])
    except json.JSONDecodeError:
        return None
    for run in document.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            status = run.get("status")
            return status if isinstance(status, str) else None
    return None


def wait_for_final_status(
    run_id: int, env: Mapping[str, str], deadline: float
) -> str | None:
    """Poll ``flwr list`` until the run has finished or ``deadline`` passes."""
    status = query_run_status(run_id, env)
    while (
        status is None or not status.startswith(RUN_STATUS_FINISHED_PREFIX)
    ) and time.monotonic() < deadline:
        time.sleep(STATUS_POLL_INTERVAL_SECONDS)
        status = query_run_status(run_id, env)
    return status


def read_results_status(results_file: Path) -> str | None:
    """Return the ``status`` field of ``results.json``, or None if unreadable."""
    try:
        document = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    status = document.get("status") if isinstance(document, dict) else None
    return status if isinstance(status, str) else None


def mark_results_stopped(
    results_file: Path, reason: str, *, failed_since: float | None = None
) -> None:
    """Mark a ``results.json`` still ``running`` as ``failed``, with ``reason``.

    The app cannot record a run that the launcher stopped, so the launcher
    does it, to keep the file from claiming the run is still going. A file
    that says ``failed`` and was written at or after ``failed_since`` (a
    `time.time` value) recorded what the stop caused; its error is kept
    after ``reason``.
    """
    try:
        modified = results_file.stat().st_mtime
        document = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if not isinstance(document, dict):
        return
    status = document.get("status")
    failed_by_stop = (
        status == RESULTS_STATUS_FAILED
        and failed_since is not None
        and modified >= failed_since
    )
    if status != RESULTS_STATUS_RUNNING and not failed_by_stop:
        return

    if failed_by_stop:
        earlier = shortened(str(document.get("error", "")), MAX_ERROR_LENGTH)
        reason = f"{reason} The ServerApp then recorded: {earlier}"
    document["status"] = RESULTS_STATUS_FAILED
    document["error"] = reason
    temp_file = results_file.with_name(f".{results_file.name}.launcher.tmp")
    temp_file.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temp_file, results_file)


def _write_failed_results(results_file: Path, reason: str) -> None:
    # The ServerApp never wrote the file, so it has only the outcome.
    if not results_file.parent.is_dir():
        return
    document = {"status": RESULTS_STATUS_FAILED, "error": reason}
    temp_file = results_file.with_name(f".{results_file.name}.launcher.tmp")
    with contextlib.suppress(OSError):
        temp_file.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(temp_file, results_file)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGINT and SIGTERM, so cleanup runs for both.

    SIGINT gets Python's own handler even when the process inherited it as
    ignored, as a command started in the background by a shell without job
    control does, so ``kill -INT`` still stops the run. Outside the main
    thread, where Python allows no signal handlers, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, handle),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launch(options: LaunchOptions, echo: IO[str] = sys.stdout) -> LaunchResult:
    """Run the app once and stop every process it started.

    Args:
        options: What to run and where.
        echo: Stream that receives the run's logs as they arrive.

    Returns:
        The outcome, with the exit status the command line should return.

    Raises:
        LaunchError: If the app folder or the run config is invalid, or the
            app's run-config check rejects it.
    """
    defaults = read_app_defaults(options.app_dir)
    run_config = dict(options.run_config)
    _warn_if_output_dir_replaced(run_config.get(OUTPUT_DIR_KEY), options.output_dir)
    run_config[OUTPUT_DIR_KEY] = str(options.output_dir)
    check_run_config_keys(run_config, set(defaults), options.app_dir)
    check_spec = read_run_config_check(options.app_dir)
    if check_spec is not None:
        check_run_config_values(
            options.app_dir,
            check_spec,
            {**defaults, **run_config},
            num_supernodes=options.num_supernodes,
        )
    try:
        run_config_text = to_toml(run_config)
    except ValueError as error:
        raise LaunchError(str(error)) from None

    # Printed only for a config that passed the checks, so a rejected one
    # names no folder that will never exist.
    print(f"[launch] output folder: {options.output_dir}", file=echo, flush=True)
    paths = RunPaths(options.output_dir)
    try:
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        _check_own_files(paths)
        _move_earlier_results(paths, echo)
        paths.run_config_file.write_text(run_config_text, encoding="utf-8")
        write_flower_config(paths.flwr_home)
    except OSError as error:
        raise LaunchError(
            f"Cannot prepare the output folder {options.output_dir}: "
            f"{_os_error_text(error)}. Choose another --output-dir."
        ) from error

    ports = pick_ports()
    # Ray's Unix socket paths must stay under about 107 bytes, so its folder
    # is a short one in /tmp rather than one inside the output folder.
    ray_temp_dir = Path(tempfile.mkdtemp(prefix="fedsec-ray-"))
    env = build_environment(os.environ, paths, ports, ray_temp_dir)
    if not become_subreaper():
        logger.warning(
            "Could not become a child subreaper (Linux prctl); processes that "
            "outlive their parent may escape cleanup."
        )

    group = _ProcessGroup(preexisting_children=set(_child_pids()))
    deadline = time.monotonic() + options.timeout
    with interrupt_on_signals():
        try:
            result = _launch_processes(
                options, paths, ports, env, group, deadline, echo
            )
        except LaunchError as error:
            result = LaunchResult(EXIT_FAILED, message=str(error))
        except KeyboardInterrupt:
            result = LaunchResult(
                EXIT_INTERRUPTED, message="Interrupted; stopping the SuperLink."
            )
        finally:
            stopped_at = time.time()
            survivors = stop_process_tree(group)
            if survivors:
                logger.error("Processes still alive after SIGKILL: %s", survivors)
            shutil.rmtree(ray_temp_dir, ignore_errors=True)

    record_unfinished_run(result, paths.results_file, stopped_at=stopped_at)
    result.message = _with_log_hint(result, paths)
    return result


def _check_own_files(paths: RunPaths) -> None:
    """Check that the files the launcher writes can take its output.

    The launcher writes them after the SuperLink starts, so a folder in
    their place would fail the run midway, and a FIFO would block it. A
    link to a character device such as /dev/null is accepted.

    Raises:
        LaunchError: If one of them exists and is neither a regular file
            nor a character device.
    """
    own_files = (
        paths.superlink_log,
        paths.superlink_console_log,
        paths.run_log,
        paths.run_config_file,
        paths.launch_info,
    )
    for path in own_files:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise LaunchError(
                f"{path} must be a file the launcher can write. Found something "
                "else there. Remove it or choose another --output-dir."
            )


def _move_earlier_results(paths: RunPaths, echo: IO[str]) -> None:
    """Move an earlier launch's ``results.json`` out of the new run's way.

    A launch that fails before the ServerApp writes its own file would
    otherwise leave the earlier run's outcome, such as ``completed``, in
    ``results.json``.

    Raises:
        LaunchError: If ``results.json`` is not a file or cannot be moved.

    """
    try:
        mode = paths.results_file.lstat().st_mode
    except FileNotFoundError:
        return
    # A symbolic link is moved as a link; its target is left alone.
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise LaunchError(
            f"{paths.results_file} is not a file, so it cannot be an earlier "
            "run's results. Remove it or choose another --output-dir."
        )
    try:
        os.replace(paths.results_file, paths.previous_results_file)
    except OSError as error:
        raise LaunchError(
            f"Cannot move the earlier {paths.results_file} to "
            f"{paths.previous_results_file}: {os_reason(error)}. Remove "
            "one of them or choose another --output-dir."
        ) from error
    print(
        f"[launch] moved the earlier {RESULTS_FILENAME} to "
        f"{paths.previous_results_file}",
        file=echo,
        flush=True,
    )


def record_unfinished_run(
    result: LaunchResult, results_file: Path, *, stopped_at: float | None = None
) -> None:
    """Mark ``results.json`` failed when the run ended without the app doing so.

    The launcher stops a run that times out or is interrupted. A run can also
    fail outside the ServerApp, for example when the simulation engine does
    not start, and then the status in ``results.json`` would remain ``running``.
    When the ServerApp wrote no file at all, the launcher writes one with the
    status and the error only.

    Stopping the processes can itself make the ServerApp record a failure,
    such as too few clients once the simulation's actors are gone. A failure
    written at or after ``stopped_at`` (a `time.time` value) is therefore
    replaced by the launcher's reason, which quotes the app's error.
    """
    if result.exit_code != EXIT_OK and not results_file.exists():
        _write_failed_results(
            results_file, f"The ServerApp recorded no outcome: {result.message}"
        )
        result.results_status = read_results_status(results_file)
        return

    if result.exit_code in (EXIT_TIMEOUT, EXIT_INTERRUPTED):
        mark_results_stopped(
            results_file,
            f"Stopped by the launcher: {result.message}",
            failed_since=stopped_at,
        )
        result.results_status = read_results_status(results_file)
        return

    if (
        result.exit_code == EXIT_FAILED
        and result.results_status == RESULTS_STATUS_RUNNING
    ):
        mark_results_stopped(
            results_file,
            "The run ended before the ServerApp recorded its outcome: "
            f"{result.message} See the SuperLink log.",
        )
        result.results_status = read_results_status(results_file)
        result.message += " The launcher marked results.json failed."


def _warn_if_output_dir_replaced(requested: object, output_dir: Path) -> None:
    if requested is None:
        return
    if isinstance(requested, str) and requested:
        with contextlib.suppress(OSError, ValueError):
            if Path(requested).resolve() == output_dir.resolve():
                return
    logger.warning(
        "Run-config %s=%r is replaced by the launcher's output folder %s; "
        "pass --output-dir to choose it.",
        OUTPUT_DIR_KEY,
        requested,
        output_dir,
    )


def _launch_processes(
    options: LaunchOptions,
    paths: RunPaths,
    ports: Ports,
    env: Mapping[str, str],
    group: _ProcessGroup,
    deadline: float,
    echo: IO[str],
) -> LaunchResult:
    group.superlink = start_superlink(paths, ports, env)
    write_launch_info(paths, ports, group.superlink.pid)
    startup_timeout = min(SUPERLINK_STARTUP_TIMEOUT_SECONDS, _remaining(deadline))
    try:
        wait_until_healthy(group.superlink, ports.http_api, paths, startup_timeout)
    except LaunchError as error:
        if _remaining(deadline) > 0:
            raise
        return LaunchResult(
            EXIT_TIMEOUT,
            message=f"The run did not finish within {options.timeout:.0f} s: {error}",
        )

    group.flwr_run = start_flwr_run(options, paths, env)
    if group.flwr_run.stdout is None:
        raise LaunchError("flwr run was started without an output pipe.")
    pump = _LogPump(group.flwr_run.stdout, paths.run_log, echo)
    pump.start()

    try:
        group.flwr_run.wait(timeout=_remaining(deadline))
    except subprocess.TimeoutExpired:
        if not ends_after_completion(group.flwr_run, paths.results_file):
            return LaunchResult(
                EXIT_TIMEOUT,
                run_id=pump.run_id,
                results_status=read_results_status(paths.results_file),
                message=f"The run did not finish within {options.timeout:.0f} s.",
            )
        deadline = time.monotonic() + COMPLETION_GRACE_SECONDS
    pump.join(timeout=5.0)

    if pump.run_id is None:
        return LaunchResult(
            EXIT_FAILED,
            message=f"flwr run exited with code {group.flwr_run.returncode} "
            "before starting a run.",
        )
    return _final_result(pump.run_id, env, paths, deadline)


def ends_after_completion(process: subprocess.Popen[Any], results_file: Path) -> bool:
    """Wait briefly for a run that recorded its outcome as the timeout fired.

    The ServerApp writes ``completed`` before Flower ends the run, so a
    timeout can fire in between. Such a run is not stopped: ``flwr run``
    gets `COMPLETION_GRACE_SECONDS` more to exit.

    Returns:
        True if ``results.json`` records ``completed`` and ``flwr run``
        exited within the grace period.

    """
    if read_results_status(results_file) != RESULTS_STATUS_COMPLETED:
        return False

    try:
        process.wait(timeout=COMPLETION_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        return False
    return True


def _final_result(
    run_id: int, env: Mapping[str, str], paths: RunPaths, deadline: float
) -> LaunchResult:
    status_deadline = min(deadline, time.monotonic() + STATUS_POLL_TIMEOUT_SECONDS)
    run_status = wait_for_final_status(run_id, env, status_deadline)
    results_status = read_results_status(paths.results_file)

    succeeded = (
        run_status == RUN_STATUS_COMPLETED
        and results_status == RESULTS_STATUS_COMPLETED
    )
    message = (
        f"Run {run_id}: SuperLink status {run_status}, results.json status "
        f"{results_status} ({paths.results_file})."
    )
    return LaunchResult(
        EXIT_OK if succeeded else EXIT_FAILED,
        run_id=run_id,
        run_status=run_status,
        results_status=results_status,
        message=message,
    )


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _with_log_hint(result: LaunchResult, paths: RunPaths) -> str:
    if result.exit_code == EXIT_OK:
        return result.message
    return (
        f"{result.message} The run did not succeed. Logs: {paths.run_log} "
        f"(streamed run output) and {paths.superlink_log} (SuperLink and "
        "simulation)."
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsec_flwr.launch",
        description="Run a Flower app on the simulation engine in a private "
        "FLWR_HOME, stop every process it started, and exit non-zero unless "
        "the run completed.",
    )
    parser.add_argument("app_dir", type=Path, help="Folder of the Flower app.")
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="Run-config overrides; may be repeated. Unquoted text values are "
        'taken as strings, e.g. "dataset=digits num-server-rounds=10".',
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=DEFAULT_NUM_SUPERNODES,
        help="Number of simulated clients (default: %(default)s).",
    )
    parser.add_argument(
        "--client-cpus",
        type=int,
        default=DEFAULT_CLIENT_CPUS,
        help="CPUs reserved per simulated client (default: %(default)s).",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Folder for results.json, logs and FLWR_HOME "
        f"(default: {DEFAULT_OUTPUT_ROOT}/<app>-<time>-<pid>).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="Seconds before the run is stopped (default: %(default)s).",
    )
    return parser


def _os_error_text(error: OSError) -> str:
    """Return the OS's text of `error` and the path it names, if any."""
    where = f" ({error.filename})" if error.filename else ""
    return f"{os_reason(error)}{where}"


def _resolved(name: str, path: str | Path) -> Path:
    """Return `path` made absolute, with symbolic links followed.

    Raises:
        LaunchError: If the path has a symbolic link loop or cannot be read.
    """
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as error:
        raise LaunchError(
            f"{name} cannot be resolved: {os_reason(error)}. Found {str(path)!r}."
        ) from error


def _check_utf8(name: str, path: Path) -> None:
    """Reject a path whose name is not UTF-8, which a run config cannot carry.

    Python decodes the bytes of such a name to lone surrogates, and the
    app receives the output folder as run-config text.

    Raises:
        LaunchError: If ``path`` has bytes that are not UTF-8.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as error:
        raise LaunchError(
            f"{name} must be a UTF-8 path, because the app receives it in its "
            f"run config. Found {os.fsencode(path)!r}."
        ) from error


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    """Validate parsed arguments and build the launch options.

    Raises:
        LaunchError: If an argument is out of range.
    """
    app_dir = _resolved("APP_DIR", args.app_dir)
    if not app_dir.is_dir():
        raise LaunchError(f"APP_DIR must be a folder. Not found: {app_dir}.")
    if args.num_supernodes < 1:
        raise LaunchError(
            f"--num-supernodes must be at least 1. Found {args.num_supernodes}."
        )
    if args.client_cpus < 1:
        raise LaunchError(
            f"--client-cpus must be at least 1. Found {args.client_cpus}."
        )
    machine_cpus = os.cpu_count() or 1
    if args.client_cpus > machine_cpus:
        raise LaunchError(
            f"--client-cpus must be at most the {machine_cpus} CPUs of this machine, "
            f"or Ray can place no client. Found {args.client_cpus}."
        )
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise LaunchError(
            f"--timeout must be a finite number of seconds above 0. "
            f"Found {args.timeout}."
        )

    output_dir = args.output_dir
    if output_dir == "":
        raise LaunchError("--output-dir must name a folder. Found ''.")
    if output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output_dir = Path(DEFAULT_OUTPUT_ROOT) / f"{app_dir.name}-{stamp}-{os.getpid()}"

    resolved_output_dir = _resolved("--output-dir", output_dir)
    _check_utf8("--output-dir", resolved_output_dir)

    return LaunchOptions(
        app_dir=app_dir,
        run_config=parse_run_config(args.run_config),
        output_dir=resolved_output_dir,
        num_supernodes=args.num_supernodes,
        client_cpus=args.client_cpus,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)

    try:
        options = options_from_args(args)
        result = launch(options)
    except LaunchError as error:
        text = shortened(str(error), MAX_ERROR_LENGTH)
        print(f"[launch] error: {text}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OSError as error:
        # The launcher has stopped every process it started by now.
        print(f"[launch] error: {_os_error_text(error)}.", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("[launch] Interrupted before the run started.", file=sys.stderr)
        return EXIT_INTERRUPTED

    stream = sys.stdout if result.exit_code == EXIT_OK else sys.stderr
    print(f"[launch] {result.message}", file=stream, flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
