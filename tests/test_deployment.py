"""Deployment tests: credentials, and real SuperLink/SuperNode processes over TLS.

The federation tests start ``flower-superlink`` and ``flower-supernode``
processes on free loopback ports and run the secure FedAvg app on the
breast-cancer data. Each federation is stopped by PID in a finalizer, also
when a test fails, and each test checks that no process it started is left.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from fedsec_flwr.deploy.__main__ import main as deploy_main
from fedsec_flwr.deploy.credentials import (
    CredentialPaths,
    CredentialsError,
    create_credentials,
    write_supernode_key_pair,
)
from fedsec_flwr.deploy.local import (
    EXIT_OK,
    RUN_STATUS_COMPLETED,
    LocalFederation,
    build_environment,
    is_alive,
    processes_mentioning,
    stop_processes,
)
from tests.deployment_helpers import (
    APP_DIR,
    ray_head_started,
    read_results,
    received_train_messages,
    run_simulation,
    start_ray_head,
    start_simulation_superlink,
    superlink_answers,
    wait_for,
    write_insecure_connection,
)

NUM_SUPERNODES = 3
HOSTS = ["127.0.0.1", "::1", "localhost"]

# Stages of one secure round, each one train message per SuperNode:
# setup, share-keys, masked-input (which trains), unmask.
MASKED_INPUT_MESSAGE = 3

# With at most 3 clients of weight at most 200, the encoding gets 22
# quantization bits, so one grid step is 2 / (2**22 - 1), about 4.8e-7 per
# coordinate. Stochastic rounding draws fresh randomness in every run, so the
# aggregates of two runs differ by up to one step per coordinate and round.
# The loss bound leaves room for that through two rounds of training. In a
# trial, a deployed and a simulated run differed by 8e-9.
COMPARISON_CONFIG: dict[str, bool | int | float | str] = {
    "dataset": "breast-cancer",
    "num-server-rounds": 2,
    "seed": 42,
    "secure-aggregation": True,
    "min-train-clients": NUM_SUPERNODES,
    "secagg-max-weight": 200,
    "secagg-max-clients": NUM_SUPERNODES,
    "secagg-timeout": 120.0,
}
LOSS_TOLERANCE = 1e-5

DROPOUT_TIMEOUT_SECONDS = 30.0
DROPOUT_CONFIG: dict[str, bool | int | float | str] = {
    "dataset": "breast-cancer",
    "num-server-rounds": 2,
    "seed": 42,
    "secure-aggregation": True,
    "min-train-clients": 2,
    "secagg-max-weight": 200,
    "secagg-max-clients": NUM_SUPERNODES,
    "secagg-timeout": DROPOUT_TIMEOUT_SECONDS,
}

FederationFactory = Callable[..., LocalFederation]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> CredentialPaths:
    directory = tmp_path_factory.mktemp("deploy") / "credentials"
    return create_credentials(directory, hosts=HOSTS, num_supernodes=NUM_SUPERNODES)


@pytest.fixture
def start_federation(
    credentials: CredentialPaths, tmp_path: Path
) -> Iterator[FederationFactory]:
    """Start federations that are stopped by PID when the test ends."""
    started: list[LocalFederation] = []

    def start(
        num_supernodes: int = NUM_SUPERNODES,
        node_config: dict[str, bool | int | float | str] | None = None,
        base_env: dict[str, str] | None = None,
    ) -> LocalFederation:
        work_dir = tmp_path / f"federation-{len(started)}"
        federation = LocalFederation(
            credentials=credentials,
            app_dir=APP_DIR,
            work_dir=work_dir,
            num_supernodes=num_supernodes,
            node_config=node_config,
            base_env=base_env,
        )
        started.append(federation)
        federation.start()
        return federation

    yield start

    for federation in started:
        federation.stop()
    leftovers = processes_mentioning(str(tmp_path))
    assert leftovers == [], f"processes left running: {leftovers}"


def assert_stopped(federation: LocalFederation) -> None:
    federation.stop()
    started = federation.started_pids()
    assert started, "the federation recorded no processes"
    still_running = [pid for pid in started if is_alive(pid)]
    assert still_running == []
    leftovers = processes_mentioning(str(federation.paths.work_dir))
    assert leftovers == []


# --------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_credentials_file_modes(credentials: CredentialPaths) -> None:
    assert _mode(credentials.directory) == 0o700
    for path in credentials.private_files():
        assert path.is_file(), path
        assert _mode(path) == 0o600, path
    for path in credentials.public_files():
        assert path.is_file(), path
        assert _mode(path) & 0o022 == 0, path


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_server_certificate_verifies_against_ca(
    credentials: CredentialPaths,
) -> None:
    ca_cert = x509.load_pem_x509_certificate(credentials.ca_cert.read_bytes())
    server_cert = x509.load_pem_x509_certificate(credentials.server_cert.read_bytes())
    store = Store([ca_cert])
    now = datetime.datetime.now(datetime.UTC)

    for subject in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        verifier = PolicyBuilder().store(store).time(now).build_server_verifier(subject)
        chain = verifier.verify(server_cert, [])
        assert chain[-1] == ca_cert

    names = server_cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_server_certificate_rejects_other_host(credentials: CredentialPaths) -> None:
    ca_cert = x509.load_pem_x509_certificate(credentials.ca_cert.read_bytes())
    server_cert = x509.load_pem_x509_certificate(credentials.server_cert.read_bytes())
    verifier = (
        PolicyBuilder()
        .store(Store([ca_cert]))
        .build_server_verifier(x509.DNSName("superlink.example.org"))
    )

    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(server_cert, [])


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_node_keys_are_openssh_p384(credentials: CredentialPaths) -> None:
    public_keys = set()
    for index in range(NUM_SUPERNODES):
        private_text = credentials.supernode_key(index).read_bytes()
        public_text = credentials.supernode_public_key(index).read_bytes()
        assert private_text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_text.startswith(b"ecdsa-sha2-nistp384 ")

        private_key = serialization.load_ssh_private_key(private_text, password=None)
        public_key = serialization.load_ssh_public_key(public_text)
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert isinstance(private_key.curve, ec.SECP384R1)
        assert private_key.public_key() == public_key
        public_keys.add(public_text.split()[1])

    assert len(public_keys) == NUM_SUPERNODES


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_credentials_keep_existing_keys(
    credentials: CredentialPaths, tmp_path: Path
) -> None:
    directory = tmp_path / "credentials"
    first = create_credentials(directory, hosts=["127.0.0.1"], num_supernodes=1)
    original_key = first.supernode_key(0).read_bytes()

    with pytest.raises(CredentialsError, match=r"already exist.*--force"):
        create_credentials(directory, hosts=["127.0.0.1"], num_supernodes=1)
    assert first.supernode_key(0).read_bytes() == original_key

    second = create_credentials(
        directory, hosts=["127.0.0.1"], num_supernodes=1, force=True
    )
    assert second.supernode_key(0).read_bytes() != original_key
    assert _mode(second.supernode_key(0)) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in second.all_files()
    )


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_credentials_reject_shared_folder(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o755)

    with pytest.raises(CredentialsError, match=r"mode 0755.*0700"):
        create_credentials(directory, hosts=["127.0.0.1"], num_supernodes=1)
    assert list(directory.iterdir()) == []


@pytest.mark.deployment
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("hosts", "num_supernodes", "message"),
    [
        ([], 1, "--host must be given at least once"),
        (["bad_host"], 1, "'bad_host' is neither an IP address nor a DNS name"),
        (["-leading.example.org"], 1, "neither an IP address nor a DNS name"),
        (["999.1.1.1"], 1, "looks like an IPv4 address"),
        (["fe80::1%eth0"], 1, "zone ids"),
        (["xn--bcher-kva.example", "bücher.example"], 1, "must be ASCII"),
        (["127.0.0.1"], 0, "--nodes must be at least 1. Found 0"),
        (["bad_host"], -2, "bad_host.*--nodes must be at least 1. Found -2"),
    ],
)
def test_credentials_reject_invalid_arguments(
    tmp_path: Path, hosts: list[str], num_supernodes: int, message: str
) -> None:
    directory = tmp_path / "credentials"

    with pytest.raises(CredentialsError, match=message):
        create_credentials(directory, hosts=hosts, num_supernodes=num_supernodes)
    assert not directory.exists()


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_credentials_command_line(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    arguments = ["credentials", "--out", str(directory), "--nodes", "2"]
    arguments += ["--host", "127.0.0.1", "--host", "::1", "--host", "localhost"]

    assert deploy_main(arguments) == 0
    assert (directory / "supernode-1.pub").is_file()
    assert deploy_main(arguments) == 2
    assert deploy_main([*arguments, "--force"]) == 0


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_run_local_rejects_invalid_node_config(
    credentials: CredentialPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["run-local", "--credentials", str(credentials.directory)]
    base += ["--app", str(APP_DIR), "--work-dir", str(tmp_path / "work")]

    assert deploy_main([*base, "--node-config", "partition-id=5"]) == 2
    assert "node_config must not set partition-id" in capsys.readouterr().err
    assert deploy_main([*base, "--node-config", "require-secure-aggregation"]) == 2
    assert "--node-config entries must have the form key=value" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "work").exists()


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_private_key_never_wider_than_0600(tmp_path: Path) -> None:
    # A permissive umask must not widen a key file created 0600.
    previous = os.umask(0)
    try:
        write_supernode_key_pair(tmp_path / "node.key", tmp_path / "node.pub")
    finally:
        os.umask(previous)

    assert _mode(tmp_path / "node.key") == 0o600
    assert _mode(tmp_path / "node.pub") == 0o644


# --------------------------------------------------------------------------
# Federation over TLS with SuperNode authentication
# --------------------------------------------------------------------------


def _round_summary(results: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [
        (entry["round"], entry["num_aggregated"], entry["num_dropped"])
        for entry in results["rounds"]
    ]


@pytest.mark.deployment
@pytest.mark.timeout(1200)
def test_secure_run_matches_simulation(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation()
    statuses = federation.supernode_statuses()
    assert sorted(statuses.values()) == ["online"] * NUM_SUPERNODES

    deployed_dir = tmp_path / "deployed"
    result = federation.run({**COMPARISON_CONFIG, "output-dir": str(deployed_dir)})
    assert result.status == RUN_STATUS_COMPLETED
    assert result.exit_code == EXIT_OK
    assert result.run_id is not None
    assert "run completed" in federation.run_logs(result.run_id)
    assert_stopped(federation)

    deployed = read_results(deployed_dir)
    assert deployed["status"] == "completed"
    assert deployed["secure_aggregation"] is True
    assert _round_summary(deployed) == [(1, 3, 0), (2, 3, 0)]

    simulated_dir = tmp_path / "simulated"
    completed = run_simulation(
        simulated_dir, COMPARISON_CONFIG, num_supernodes=NUM_SUPERNODES, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    simulated = read_results(simulated_dir)
    assert _round_summary(simulated) == [(1, 3, 0), (2, 3, 0)]

    for deployed_round, simulated_round in zip(
        deployed["rounds"], simulated["rounds"], strict=True
    ):
        assert deployed_round["accuracy"] == simulated_round["accuracy"]
        assert deployed_round["loss"] == pytest.approx(
            simulated_round["loss"], abs=LOSS_TOLERANCE
        )


@pytest.mark.deployment
@pytest.mark.timeout(300)
def test_unregistered_supernode_rejected(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation(num_supernodes=1)
    rogue_key = tmp_path / "rogue.key"
    write_supernode_key_pair(rogue_key, tmp_path / "rogue.pub")

    rogue = federation.start_supernode(0, private_key=rogue_key, name="rogue")
    exit_code = rogue.popen.wait(timeout=120)

    assert exit_code != 0
    assert "Failed to activate SuperNode" in rogue.read_log()
    superlink_log = federation.paths.superlink_log.read_text(encoding="utf-8")
    assert "No SuperNode found with the given public key" in superlink_log
    assert list(federation.supernode_statuses().values()) == ["online"]
    assert_stopped(federation)


@pytest.mark.timeout(60)
def test_stop_spares_processes_that_only_name_the_folder(
    credentials: CredentialPaths, tmp_path: Path
) -> None:
    # Neither a command line naming the folder (timeout around the launcher,
    # tail -f on a log) nor an FLWR_HOME that only starts with the folder's
    # name ties a process to the federation.
    work_dir = tmp_path / "federation"
    federation = LocalFederation(
        credentials=credentials, app_dir=APP_DIR, work_dir=work_dir, num_supernodes=1
    )
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(600)"]
    bystanders = [
        subprocess.Popen([*sleeper, str(work_dir / "logs" / "superlink.log")]),
        subprocess.Popen(
            sleeper,
            env=build_environment(os.environ, tmp_path / "federation-home"),
        ),
    ]
    try:
        assert wait_for(
            lambda: len(processes_mentioning(str(work_dir))) == 2, timeout=10
        )

        federation.stop()

        assert all(process.poll() is None for process in bystanders)
    finally:
        for process in bystanders:
            process.kill()
            process.wait()


@pytest.mark.deployment
@pytest.mark.timeout(60)
def test_stop_ends_processes_outside_the_tree(
    credentials: CredentialPaths, tmp_path: Path
) -> None:
    # A SuperNode that exits before it is stopped leaves its flower-superexec
    # in a session of its own. Only its FLWR_HOME ties it to the federation.
    federation = LocalFederation(
        credentials=credentials,
        app_dir=APP_DIR,
        work_dir=tmp_path / "federation",
        num_supernodes=1,
    )
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env=build_environment(os.environ, federation.paths.supernode_home("gone")),
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: processes_mentioning(str(tmp_path)) != [], timeout=10)

        federation.stop()

        # The sweep may reap the child itself, so only its end is checked.
        stray.wait(timeout=10)
        assert processes_mentioning(str(tmp_path)) == []
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


@pytest.mark.deployment
@pytest.mark.timeout(300)
def test_superlink_serves_only_tls(start_federation: FederationFactory) -> None:
    federation = start_federation(num_supernodes=1)
    assert federation.port is not None

    superlink_log = federation.paths.superlink_log.read_text(encoding="utf-8")
    assert f"running on https://{federation.address}" in superlink_log
    assert not superlink_answers(federation.port)
    assert_stopped(federation)


def run_and_kill_in_round_two(
    federation: LocalFederation,
    config: dict[str, bool | int | float | str],
    *,
    messages: int,
    stage: str,
    interval: float = 0.2,
) -> dict[str, Any]:
    """Run ``config``, kill supernode-2 at its ``messages``-th message of round 2.

    Returns the results of the run, which must complete.
    """
    victim = federation.supernodes["supernode-2"]
    submitted = federation.submit_run(config)

    reached = wait_for(
        lambda: received_train_messages(victim.read_log(), 2) >= messages,
        timeout=900,
        interval=interval,
    )
    assert reached, f"supernode-2 never reached the {stage} stage of round 2"
    federation.kill_supernode(2)
    assert not victim.is_running()

    result = federation.wait_for_run(submitted, deadline=time.monotonic() + 600)
    assert result.status == RUN_STATUS_COMPLETED
    results = read_results(Path(str(config["output-dir"])))
    assert results["status"] == "completed"
    return results


@pytest.mark.deployment
@pytest.mark.timeout(1200)
def test_supernode_killed_after_key_sharing(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    # With 3 clients each has 2 neighbours and threshold 2, so a node accepts
    # a dropped neighbour only if it trusts the server's dropout lists.
    federation = start_federation(node_config={"trust-dropout-reports": True})
    config = {**DROPOUT_CONFIG, "output-dir": str(tmp_path / "dropout")}

    # The third train message of round 2 starts the masked-input stage, so the
    # victim has sent its seed shares but not its masked update.
    results = run_and_kill_in_round_two(
        federation, config, messages=MASKED_INPUT_MESSAGE, stage="masked-input"
    )

    assert _round_summary(results) == [(1, 3, 0), (2, 2, 1)]
    second_round = results["rounds"][1]
    assert second_round["dropped_by_stage"]["masked-input"] == 1
    # The survivors do not wait longer than the stage timeout for the victim.
    first_round = results["rounds"][0]
    assert (
        second_round["seconds"] < first_round["seconds"] + 2 * DROPOUT_TIMEOUT_SECONDS
    )
    assert_stopped(federation)


# The second reply of a round is the reply to its share-keys request.
SHARE_KEYS_REPLY = 2
UPLOAD_KILL_DIR = Path(__file__).resolve().parent / "upload_kill"


@pytest.mark.deployment
@pytest.mark.timeout(1200)
def test_supernode_killed_mid_upload(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    # supernode-2 dies after its share-keys reply reached the SuperLink but
    # before the reply's contents did, so that reply can never be downloaded.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (str(UPLOAD_KILL_DIR), env.get("PYTHONPATH")) if path
    )
    env["FEDSEC_KILL_HOME"] = str(
        (tmp_path / "federation-0" / "supernode-2-home").resolve()
    )
    env["FEDSEC_KILL_ROUND"] = "2"
    env["FEDSEC_KILL_REPLY"] = str(SHARE_KEYS_REPLY)
    federation = start_federation(
        node_config={"trust-dropout-reports": True}, base_env=env
    )
    assert federation.paths.supernode_home("supernode-2") == Path(
        env["FEDSEC_KILL_HOME"]
    )
    config = {**DROPOUT_CONFIG, "output-dir": str(tmp_path / "mid-upload")}

    result = federation.run(config, timeout=600)

    victim = federation.supernodes["supernode-2"]
    assert "upload_kill: killed after PushMessages" in victim.read_log()
    assert not victim.is_running()
    assert result.status == RUN_STATUS_COMPLETED
    results = read_results(tmp_path / "mid-upload")
    assert _round_summary(results) == [(1, 3, 0), (2, 2, 1)]
    second_round = results["rounds"][1]
    assert second_round["dropped_by_stage"]["share-keys"] == 1
    # The share-keys stage ends at its deadline, not when flwr 1.42 gives up
    # on the unfinished upload 180 s later.
    assert second_round["timings"]["share-keys"] < DROPOUT_TIMEOUT_SECONDS + 10
    assert_stopped(federation)


# A verified round adds commit and verify after unmask, so the fourth train
# message of a round is the unmask request.
UNMASK_MESSAGE = 4


@pytest.mark.deployment
@pytest.mark.timeout(1200)
def test_supernode_killed_before_commit_discards_round(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation()
    output_dir = tmp_path / "discard"
    config = {
        **DROPOUT_CONFIG,
        "num-server-rounds": 3,
        "verification": True,
        "output-dir": str(output_dir),
    }

    # The victim received the unmask request, so its masked input is in the
    # round's aggregate, but it never commits to it.
    results = run_and_kill_in_round_two(
        federation, config, messages=UNMASK_MESSAGE, stage="unmask", interval=0.05
    )

    rounds = results["rounds"]
    assert [entry["verified"] for entry in rounds] == [True, False, True]
    assert [entry["discarded"] for entry in rounds] == [False, True, False]
    assert [entry["num_aggregated"] for entry in rounds] == [3, 3, 2]
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsec_flwr.audit",
            str(output_dir / "audit.json"),
            "--initial-model",
            str(output_dir / "initial_model.npz"),
            "--final-model",
            str(output_dir / "final_model.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "2 of 3 entries verified, 1 discarded" in audit.stdout
    assert_stopped(federation)


# With run keys a round has two train messages per SuperNode: keyed-input
# (which trains) and keyed-unmask.
KEYED_UNMASK_MESSAGE = 2


@pytest.mark.deployment
@pytest.mark.timeout(1200)
def test_run_keys_survive_supernode_killed_after_input(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation()
    config = {
        **DROPOUT_CONFIG,
        "secagg-key-lifetime": "run",
        "output-dir": str(tmp_path / "run-keys"),
    }

    # The second train message of round 2 is the unmask request, so the victim
    # has already sent its masked input and its seed shares.
    results = run_and_kill_in_round_two(
        federation, config, messages=KEYED_UNMASK_MESSAGE, stage="keyed-unmask"
    )

    rounds = results["rounds"]
    # Round 2 keeps the victim's input: its seed is rebuilt from the shares.
    # With 3 clients a dropout before keyed-input would abort a round (each
    # client reveals the seeds of at most threshold - 2 = 0 dropouts), so the
    # run ends with round 2.
    assert [entry["num_aggregated"] for entry in rounds] == [3, 3]
    # Every node registered in round 1, and no round ran the per-round stages.
    assert rounds[0]["dropped_by_stage"]["register"] == 0
    assert all("share-keys" not in entry["timings"] for entry in rounds)
    assert_stopped(federation)


@pytest.mark.deployment
@pytest.mark.timeout(900)
def test_all_supernodes_killed_fails_run(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation()
    output_dir = tmp_path / "all-killed"
    submitted = federation.submit_run({**DROPOUT_CONFIG, "output-dir": str(output_dir)})

    reached = wait_for(
        lambda: all(
            received_train_messages(node.read_log(), 1) >= 1
            for node in federation.supernodes.values()
        ),
        timeout=600,
        interval=0.2,
    )
    assert reached, "the SuperNodes never received the first message"
    for index in range(NUM_SUPERNODES):
        federation.kill_supernode(index)

    result = federation.wait_for_run(submitted, deadline=time.monotonic() + 600)
    assert result.status == "finished:failed"
    assert result.exit_code != 0
    assert read_results(output_dir)["status"] == "failed"
    assert_stopped(federation)


# The SuperNodes' operators accept epsilon 1.05 over the run and count on the
# noise of all 3 clients. A server that calibrates for epsilon 1 over the same
# 3 clients fits that budget; one that calibrates for epsilon 8 does not.
BUDGET_NODE_CONFIG: dict[str, bool | int | float | str] = {
    "dp-max-epsilon": 1.05,
    "dp-min-honest-clients": NUM_SUPERNODES,
}
# Under DP every client has weight 1, so the app rejects secagg-max-weight.
DISTRIBUTED_DP_CONFIG: dict[str, bool | int | float | str] = {
    **{k: v for k, v in COMPARISON_CONFIG.items() if k != "secagg-max-weight"},
    "dp-mode": "distributed",
    "clipping-norm": 1.0,
}


@pytest.mark.deployment
@pytest.mark.timeout(900)
def test_node_budget_holds_against_the_run_config(
    start_federation: FederationFactory, tmp_path: Path
) -> None:
    federation = start_federation(node_config=BUDGET_NODE_CONFIG)

    within = federation.run(
        {
            **DISTRIBUTED_DP_CONFIG,
            "target-epsilon": 1.0,
            "output-dir": str(tmp_path / "within"),
        },
        timeout=600,
    )
    above = federation.run(
        {
            **DISTRIBUTED_DP_CONFIG,
            "target-epsilon": 8.0,
            "output-dir": str(tmp_path / "above"),
        },
        timeout=600,
    )
    plain_config = {
        key: value
        for key, value in COMPARISON_CONFIG.items()
        if not key.startswith("secagg-")
    }
    plain = federation.run(
        {
            **plain_config,
            "secure-aggregation": False,
            "output-dir": str(tmp_path / "plain"),
        },
        timeout=600,
    )

    assert within.status == RUN_STATUS_COMPLETED
    epsilons = [
        entry["epsilon"] for entry in read_results(tmp_path / "within")["rounds"]
    ]
    assert len(epsilons) == 2
    assert 0 < epsilons[-1] <= 1.0
    assert above.status == "finished:failed"
    above_error = read_results(tmp_path / "above")["error"]
    assert "above its max_epsilon 1.05" in above_error
    assert plain.status == "finished:failed"
    assert plain.exit_code != 0
    plain_results = read_results(tmp_path / "plain")
    assert plain_results["status"] == "failed"
    # The nodes, not the run config, reject the plain run.
    assert "has no 'fedsec.secagg' ConfigRecord" in plain_results["error"]
    assert_stopped(federation)


# --------------------------------------------------------------------------
# Simulation on an existing Ray cluster
# --------------------------------------------------------------------------


@pytest.mark.deployment
@pytest.mark.timeout(900)
def test_simulation_on_existing_ray_cluster(tmp_path: Path) -> None:
    # Ray's socket paths must stay under 108 bytes, so its folder is short.
    ray_dir = Path(os.path.realpath("/tmp")) / f"ray-{os.getpid()}-{time.time_ns()}"
    ray_dir.mkdir()
    processes = []
    try:
        ray_head, ray_address = start_ray_head(ray_dir, tmp_path / "ray.log")
        processes.append(ray_head)
        assert wait_for(lambda: ray_head_started(ray_head), timeout=180), (
            ray_head.read_log()[-3000:]
        )
        ray_head.record_descendants()

        superlink, port = start_simulation_superlink(tmp_path, ray_address=ray_address)
        processes.insert(0, superlink)
        assert wait_for(lambda: superlink_answers(port), timeout=120)
        cli_home = tmp_path / "cli-home"
        write_insecure_connection(cli_home, "ray-sim", port)
        output_dir = tmp_path / "outputs"
        completed = _run_simulation_cli(cli_home, port, output_dir)

        assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
        assert "Successfully started run" in completed.stdout
        results = read_results(output_dir)
        assert results["status"] == "completed"
        assert _round_summary(results) == [(1, 2, 0)]
        # The simulation's Ray driver logs into the cluster's session folder,
        # which only exists because the simulation joined this cluster.
        driver_logs = list(ray_dir.glob("session_*/logs/python-core-driver-*"))
        assert driver_logs, "no Ray driver joined the cluster"
    finally:
        survivors = stop_processes(processes)

    assert survivors == []
    leftovers = processes_mentioning(str(ray_dir)) + processes_mentioning(str(tmp_path))
    assert leftovers == []
    shutil.rmtree(ray_dir, ignore_errors=True)


def _run_simulation_cli(
    cli_home: Path, port: int, output_dir: Path
) -> subprocess.CompletedProcess[str]:
    command = [
        "flwr",
        "run",
        str(APP_DIR),
        "ray-sim",
        "--run-config",
        f'num-server-rounds=1 dataset="breast-cancer" output-dir="{output_dir}"',
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
        "--stream",
    ]
    return subprocess.run(
        command,
        env=build_environment(os.environ, cli_home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# --------------------------------------------------------------------------
# Local deployment script
# --------------------------------------------------------------------------


@pytest.mark.deployment
@pytest.mark.timeout(600)
def test_deploy_script_fails_on_failed_run(tmp_path: Path) -> None:
    # The app rejects an unknown dataset inside the run, so the SuperLink
    # records the run as failed although `flwr run` exits 0.
    script = APP_DIR.parent.parent / "scripts" / "deploy_local.sh"
    env = {**os.environ, "WORK_DIR": str(tmp_path / "work"), "NUM_SUPERNODES": "2"}
    completed = subprocess.run(
        ["bash", str(script), 'dataset="no-such-dataset" num-server-rounds=1'],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    assert "finished:failed" in output
    assert f"Logs: {tmp_path / 'work' / 'federation' / 'logs'}" in output
    assert (
        read_results(tmp_path / "work" / "federation" / "outputs" / "run-1")["status"]
        == "failed"
    )
    assert processes_mentioning(str(tmp_path)) == []
