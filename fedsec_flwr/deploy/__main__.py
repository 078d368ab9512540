r"""Command line of ``python -m fedsec_flwr.deploy``.

Subcommands:

- ``credentials``: write the CA, the SuperLink's TLS key and certificate, and
  one authentication key pair per SuperNode;
- ``supernode-key``: write one SuperNode key pair, on the SuperNode's host;
- ``run-local``: run an app on a SuperLink and SuperNodes on this machine,
  over TLS with SuperNode authentication, and exit non-zero unless the run
  completed.

Examples::

    python -m fedsec_flwr.deploy credentials --out creds \\
        --host 127.0.0.1 --host ::1 --host localhost --nodes 3
    python -m fedsec_flwr.deploy run-local --credentials creds \\
        --app apps/secure_fedavg --work-dir work -c "num-server-rounds=2"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedsec_flwr.launch import (
    LaunchError,
    interrupt_on_signals,
    parse_run_config,
    read_results_status,
)

from .credentials import (
    DEFAULT_VALIDITY_DAYS,
    PRIVATE_DIR_MODE,
    SUPERNODE_KEY_PREFIX,
    CredentialPaths,
    CredentialsError,
    create_credentials,
    write_supernode_key_pair,
)
from .local import (
    DEFAULT_RUN_TIMEOUT_SECONDS,
    EXIT_FAILED,
    EXIT_OK,
    LOOPBACK_HOST,
    DeploymentError,
    LocalFederation,
    RunResult,
)

logger = logging.getLogger("fedsec_flwr.deploy")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RESULTS_FILENAME = "results.json"
RESULTS_STATUS_COMPLETED = "completed"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


# --------------------------------------------------------------------------
# credentials
# --------------------------------------------------------------------------


def _add_credentials_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "credentials",
        help="Create the CA, the SuperLink TLS certificate and SuperNode keys.",
        description="Create a CA, a SuperLink TLS key and certificate signed by "
        "it, and one OpenSSH ECDSA P-384 key pair per SuperNode. Private keys "
        "are written with mode 0600 in a folder with mode 0700.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="Output folder (created 0700)."
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="Host name or IP address under which SuperNodes and the flwr CLI "
        "reach the SuperLink; repeat for each. All go into the server "
        "certificate's subject alternative names.",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        required=True,
        help="Number of SuperNode key pairs to create (at least 1).",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_VALIDITY_DAYS,
        help="Certificate validity in days (default: %(default)s).",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Replace existing credential files in --out.",
    )
    parser.set_defaults(handler=_run_credentials)


def _run_credentials(args: argparse.Namespace) -> int:
    try:
        paths = create_credentials(
            args.out,
            hosts=args.host,
            num_supernodes=args.nodes,
            days=args.days,
            force=args.force,
        )
    except CredentialsError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    print(describe_credentials(paths))
    return EXIT_OK


def describe_credentials(paths: CredentialPaths) -> str:
    """Return a summary of the written files and the host each belongs on."""
    lines = [
        f"Credentials written to {paths.directory}:",
        f"  {paths.ca_key.name}: CA private key. Keep it offline; it is needed "
        "only to sign a new server certificate.",
        f"  {paths.ca_cert.name}: CA certificate. Copy it to every SuperLink, "
        "SuperNode and flwr CLI host.",
        f"  {paths.server_key.name}, {paths.server_cert.name}: SuperLink TLS key "
        "and certificate. Copy them to the SuperLink host only.",
        f"  {SUPERNODE_KEY_PREFIX}<i>.key: private key of SuperNode i. Copy each "
        "to its own SuperNode host only.",
        f"  {SUPERNODE_KEY_PREFIX}<i>.pub: public key of SuperNode i. Register it "
        "with 'flwr supernode register'.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# supernode-key
# --------------------------------------------------------------------------


def _add_supernode_key_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "supernode-key",
        help="Create one SuperNode key pair on the SuperNode's own host.",
        description="Create one OpenSSH ECDSA P-384 key pair: KEY (mode 0600) "
        "and KEY with the suffix .pub. Only the .pub file leaves the host; "
        "register it with 'flwr supernode register'.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="KEY",
        help="Path of the private key, such as hospital-a.key.",
    )
    parser.add_argument(
        "--force", action="store_true", help="Replace existing key files."
    )
    parser.set_defaults(handler=_run_supernode_key)


def _run_supernode_key(args: argparse.Namespace) -> int:
    private_path = Path(args.out)
    public_path = private_path.with_suffix(".pub")
    if private_path.suffix == ".pub":
        print(
            f"error: --out must not end in .pub. Found {private_path}.", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        private_path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        write_supernode_key_pair(private_path, public_path, force=args.force)
    except CredentialsError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    print(f"Private key: {private_path} (keep it on this host).")
    print(f"Public key: {public_path} (send it to the federation operator).")
    return EXIT_OK


# --------------------------------------------------------------------------
# run-local
# --------------------------------------------------------------------------


def _add_run_local_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "run-local",
        help="Run an app on a local SuperLink and SuperNodes over TLS.",
        description="Start a SuperLink with TLS and SuperNode authentication, "
        "register and start the SuperNodes, run the app once, and stop every "
        "process. Exits 0 only if the run completed.",
    )
    parser.add_argument(
        "--credentials",
        type=Path,
        required=True,
        help="Folder written by the credentials subcommand.",
    )
    parser.add_argument(
        "--app", type=Path, required=True, help="Folder of the Flower app."
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="Folder for logs, state and outputs (default: runs/deploy-<time>-<pid>).",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="SuperNodes to start (default: every key pair in --credentials).",
    )
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="Run-config overrides; may be repeated.",
    )
    parser.add_argument(
        "--node-config",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="Node-config values for every SuperNode, such as "
        "'require-secure-aggregation=true'; may be repeated.",
    )
    parser.add_argument(
        "--host",
        default=LOOPBACK_HOST,
        help="Loopback address of the SuperLink; must be in the server "
        "certificate (default: %(default)s).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_RUN_TIMEOUT_SECONDS,
        help="Seconds the run may take before it is stopped (default: %(default)s).",
    )
    parser.set_defaults(handler=_run_local)


def count_supernode_keys(directory: Path) -> int:
    """Return how many ``supernode-<i>.key`` files exist, counting from 0."""
    count = 0
    while (directory / f"{SUPERNODE_KEY_PREFIX}{count}.key").is_file():
        count += 1
    return count


def _run_local(args: argparse.Namespace) -> int:
    try:
        node_config = parse_run_config(args.node_config, option="--node-config")
        federation = _federation_from_args(args, node_config)
        run_config = parse_run_config(args.run_config)
    except (DeploymentError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        message = f"--timeout must be positive. Found {args.timeout}."
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE

    print(f"Logs: {federation.paths.logs_dir}", flush=True)
    with interrupt_on_signals():
        try:
            with federation:
                result = federation.run(run_config, timeout=args.timeout)
        except DeploymentError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("Interrupted. Every federation process was stopped.", file=sys.stderr)
            return EXIT_INTERRUPTED

    return _report(result, federation)


def _federation_from_args(
    args: argparse.Namespace, node_config: dict[str, bool | int | float | str]
) -> LocalFederation:
    directory = Path(args.credentials)
    num_keys = count_supernode_keys(directory)
    if num_keys == 0:
        raise DeploymentError(
            f"--credentials folder {directory} contains no "
            f"{SUPERNODE_KEY_PREFIX}0.key. Create it with the credentials "
            "subcommand."
        )
    work_dir = args.work_dir
    if work_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        work_dir = Path("runs") / f"deploy-{stamp}-{os.getpid()}"
    return LocalFederation(
        credentials=CredentialPaths(directory, num_keys),
        app_dir=Path(args.app),
        work_dir=Path(work_dir),
        num_supernodes=args.nodes,
        host=args.host,
        node_config=node_config,
    )


def _report(result: RunResult, federation: LocalFederation) -> int:
    results_file = result.output_dir / RESULTS_FILENAME
    results_status = read_results_status(results_file)
    # Apps that write no results.json are judged by the SuperLink status alone.
    results_ok = results_status in (None, RESULTS_STATUS_COMPLETED)
    summary = (
        f"Run {result.run_id}: SuperLink status {result.status}, "
        f"results.json status {results_status} ({results_file})."
    )
    if result.succeeded and results_ok:
        print(summary)
        return EXIT_OK

    print(
        f"{summary} The run did not succeed. Logs: {result.log_path} (run "
        f"output), {federation.paths.superlink_log} (SuperLink and ServerApp), "
        f"{federation.paths.logs_dir} (SuperNodes).",
        file=sys.stderr,
    )
    return result.exit_code if result.exit_code != EXIT_OK else EXIT_FAILED


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``python -m fedsec_flwr.deploy``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsec_flwr.deploy",
        description="Create deployment credentials and run Flower apps on a "
        "local TLS federation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_credentials_parser(subparsers)
    _add_supernode_key_parser(subparsers)
    _add_run_local_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    exit_code: int = args.handler(args)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
