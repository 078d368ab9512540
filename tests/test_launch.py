import io
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsec_flwr import launch

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"

# A small, fast run of the real app: 2 clients, 1 round, plain aggregation.
TINY_RUN_CONFIG = "num-server-rounds=1 secure-aggregation=false"
TINY_SUPERNODES = "2"

# Source of an app's run-config check, with the body's one line to format in.
_CHECK = "def check(run_config):\n    {}\n"


def _run_launcher(
    output_dir: Path, run_config: str, *extra: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--output-dir",
        str(output_dir),
        "--run-config",
        run_config,
        *extra,
    ]
    return subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _processes_referring_to(path: Path) -> list[int]:
    """PIDs whose command line or environment mentions ``path``."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                content = (entry / name).read_bytes()
            except OSError:
                continue
            if needle in content:
                found.append(int(entry.name))
                break
    return [pid for pid in found if _is_running(pid)]


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _assert_nothing_left(output_dir: Path) -> None:
    info = json.loads((output_dir / "logs" / "launch.json").read_text())

    assert not _is_running(info["superlink_pid"])
    assert not launch.is_port_listening(info["http_api_port"])
    assert _processes_referring_to(output_dir) == []


def _results_status(output_dir: Path) -> str:
    document = json.loads((output_dir / "results.json").read_text())
    status: str = document["status"]
    return status


def test_parse_run_config_types() -> None:
    parsed = launch.parse_run_config(
        ["dataset=digits num-server-rounds=10", "learning-rate=0.1 flag=true"]
    )

    assert parsed == {
        "dataset": "digits",
        "num-server-rounds": 10,
        "learning-rate": 0.1,
        "flag": True,
    }


def test_parse_run_config_quoted_string() -> None:
    parsed = launch.parse_run_config(["output-dir='/tmp/a b'", 'name="7"'])

    assert parsed["output-dir"] == "/tmp/a b"
    assert parsed["name"] == "7"


def test_parse_run_config_rejects_missing_equals() -> None:
    with pytest.raises(launch.LaunchError, match=r"form key=value\. Found 'dataset'"):
        launch.parse_run_config(["dataset"])


def test_to_toml_round_trip() -> None:
    values: dict[str, bool | int | float | str] = {
        "dataset": 'a "quoted" name',
        "num-server-rounds": 3,
        "learning-rate": 0.05,
        "secure-aggregation": False,
    }

    assert tomllib.loads(launch.to_toml(values)) == values


@pytest.mark.parametrize(
    "text",
    ["runs/emoji\U0001f600", "tab\there", "del\x7fand\x01bell", "back\\slash", "é ß"],
    ids=["astral", "tab", "controls", "backslash", "latin"],
)
def test_to_toml_round_trips_any_text(text: str) -> None:
    values: dict[str, bool | int | float | str] = {"output-dir": text, text: 1}

    assert tomllib.loads(launch.to_toml(values)) == values


def test_to_toml_rejects_lone_surrogate() -> None:
    with pytest.raises(ValueError, match=r"lone surrogate U\+DCFF"):
        launch.to_toml({"output-dir": "runs/\udcff"})


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_non_finite_timeout_is_usage_error(value: str, tmp_path: Path) -> None:
    exit_code = launch.main(
        [str(APP_DIR), "--output-dir", str(tmp_path), "--timeout", value]
    )

    assert exit_code == launch.EXIT_USAGE


def test_unknown_run_config_key_rejected() -> None:
    known = launch.read_app_config_keys(APP_DIR)

    with pytest.raises(launch.LaunchError, match=r"Unknown run-config key.*bogus-key"):
        launch.check_run_config_keys({"bogus-key": 1}, known, APP_DIR)


def test_invalid_value_rejected_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "rejected"

    exit_code = launch.main(
        [
            str(APP_DIR),
            "--output-dir",
            str(output_dir),
            "--run-config",
            "learning-rate=-1 dataset=no-such-dataset",
        ]
    )

    assert exit_code == launch.EXIT_USAGE
    captured = capsys.readouterr()
    assert "learning-rate must be positive; found -1.0" in captured.err
    assert "'no-such-dataset'" in captured.err
    assert not output_dir.exists()
    assert "output folder" not in captured.out


def test_app_check_receives_defaults_with_overrides(tmp_path: Path) -> None:
    app_dir = _app_with_check(
        tmp_path,
        "def check(run_config):\n"
        "    raise ValueError('seen ' + repr(sorted(run_config.items())))\n",
    )
    options = launch.LaunchOptions(
        app_dir=app_dir, run_config={"rounds": 7}, output_dir=tmp_path / "out"
    )

    with pytest.raises(launch.LaunchError) as raised:
        launch.launch(options)

    seen = [("mode", "fast"), ("output-dir", str(tmp_path / "out")), ("rounds", 7)]
    assert str(raised.value) == f"seen {seen!r}"
    assert not (tmp_path / "out").exists()


def test_replaced_output_dir_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app_dir = _app_with_check(
        tmp_path,
        "def check(run_config):\n    raise ValueError(run_config['output-dir'])\n",
    )
    options = launch.LaunchOptions(
        app_dir=app_dir,
        run_config={"output-dir": "elsewhere"},
        output_dir=tmp_path / "out",
    )

    with pytest.raises(launch.LaunchError, match=r"out$"):
        launch.launch(options)

    assert "output-dir='elsewhere' is replaced" in caplog.text
    assert str(tmp_path / "out") in caplog.text


@pytest.mark.parametrize(
    ("spec", "source", "message"),
    [
        ("not a spec", "", r"must have the form 'package\.module:function'\. "),
        ("no_such_module_here:check", "", r"cannot import no_such_module_here"),
        ("{module}:missing", "", r"has no attribute missing"),
        ("{module}:check", "check = 5\n", r"not callable; found .* type int"),
        ("{module}:check", "1 +\n", r"cannot import .*SyntaxError"),
        ("{module}:check", _CHECK.format("raise SystemExit(0)"), r"SystemExit: 0\.$"),
        ("{module}:check", _CHECK.format("raise TypeError('bug')"), r"TypeError: bug"),
        ("{module}:check", _CHECK.format("input()"), r"raised EOFError"),
        ("{module}:check", _CHECK.format("yield 1"), r"returned a generator"),
        ("{module}:check", "async " + _CHECK.format("pass"), r"returned a coroutine"),
    ],
)
def test_broken_app_check_is_reported(
    tmp_path: Path, spec: str, source: str, message: str
) -> None:
    app_dir = _app_with_check(tmp_path, source or _CHECK.format("pass"), spec)
    options = launch.LaunchOptions(
        app_dir=app_dir, run_config={}, output_dir=tmp_path / "out"
    )

    with pytest.raises(launch.LaunchError, match=message):
        launch.launch(options)

    assert not (tmp_path / "out").exists()


def test_app_check_without_message_says_so(tmp_path: Path) -> None:
    app_dir = _app_with_check(tmp_path, _CHECK.format("raise ValueError()"))

    with pytest.raises(launch.LaunchError, match=r"^ValueError without a message$"):
        launch.check_run_config_values(app_dir, _spec(tmp_path), {})


def test_app_check_changes_nothing_in_the_launcher(tmp_path: Path) -> None:
    # The check imports a module of the app only when it runs, and
    # changes the environment, which must not reach the processes that
    # the launcher starts.
    app_dir = _app_with_check(
        tmp_path,
        _CHECK.format(
            "import os, sys, helper_rules; os.environ['FEDSEC_LEAK'] = '1'; "
            "sys.path.append('/leak')"
        ),
    )
    (app_dir / "helper_rules.py").write_text("", encoding="utf-8")
    path_before = list(sys.path)

    launch.check_run_config_values(app_dir, _spec(tmp_path), {"rounds": 3})

    assert "FEDSEC_LEAK" not in os.environ
    assert sys.path == path_before
    assert _module_name(tmp_path) not in sys.modules


def test_app_module_hidden_by_installed_module_is_reported(tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "json.py").write_text(_CHECK.format("pass"), encoding="utf-8")

    with pytest.raises(launch.LaunchError, match=r"json in .* is hidden by the module"):
        launch.check_run_config_values(app_dir, "json:check", {})


def _module_name(tmp_path: Path) -> str:
    # A module name of its own per test, since imports are cached.
    return f"launch_check_{tmp_path.name.replace('-', '_')}"


def _spec(tmp_path: Path) -> str:
    return f"{_module_name(tmp_path)}:check"


def _app_with_check(tmp_path: Path, source: str, spec: str = "{module}:check") -> Path:
    module = _module_name(tmp_path)
    app_dir = tmp_path / "app"
    app_dir.mkdir(parents=True)
    (app_dir / f"{module}.py").write_text(source, encoding="utf-8")
    (app_dir / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\n"
        'rounds = 3\nmode = "fast"\noutput-dir = "x"\n'
        "[tool.fedsec_flwr.launch]\n"
        f'check-run-config = "{spec.format(module=module)}"\n',
        encoding="utf-8",
    )
    return app_dir


def test_same_output_dir_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app_dir = _app_with_check(tmp_path, _CHECK.format("raise ValueError('stop')"))
    options = launch.LaunchOptions(
        app_dir=app_dir,
        run_config={"output-dir": "out/"},
        output_dir=tmp_path / "out",
    )

    with pytest.raises(launch.LaunchError, match="stop"):
        launch.launch(options)

    assert "replaced" not in caplog.text


def test_undeclared_output_dir_rejected(tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\nrounds = 3\n", encoding="utf-8"
    )
    options = launch.LaunchOptions(
        app_dir=app_dir, run_config={}, output_dir=tmp_path / "out"
    )

    with pytest.raises(launch.LaunchError, match=r"must declare output-dir"):
        launch.launch(options)


def test_empty_output_dir_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code = launch.main([str(APP_DIR), "--output-dir", ""])

    assert exit_code == launch.EXIT_USAGE
    assert "--output-dir must name a folder. Found ''." in capsys.readouterr().err


def test_long_value_in_error_is_shortened(capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = launch.main([str(APP_DIR), "--run-config", "dataset=" + "x" * 100_000])

    error = capsys.readouterr().err
    assert exit_code == launch.EXIT_USAGE
    assert "dataset must be one of" in error
    assert "characters in all)" in error
    assert len(error) < launch.MAX_ERROR_LENGTH + 100


def test_client_cpus_above_the_machine_is_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    exit_code = launch.main([str(APP_DIR), "--client-cpus", "3"])

    assert exit_code == launch.EXIT_USAGE
    error = capsys.readouterr().err
    assert "--client-cpus must be at most the 2 CPUs of this machine" in error
    assert "Found 3." in error


def test_non_utf8_output_dir_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/out\xff")

    exit_code = launch.main([str(APP_DIR), "--output-dir", folder])

    error = capsys.readouterr().err
    assert exit_code == launch.EXIT_USAGE
    assert "--output-dir must be a UTF-8 path" in error
    assert "out\\xff'" in error
    assert not os.path.lexists(folder)


def test_missing_app_dir_is_usage_error(tmp_path: Path) -> None:
    exit_code = launch.main([str(tmp_path / "missing"), "--output-dir", str(tmp_path)])

    assert exit_code == launch.EXIT_USAGE


def test_list_descendants_finds_grandchild() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time; "
            "subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); "
            "time.sleep(30)",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        descendants = launch.list_descendants([child.pid])
        while not descendants and time.monotonic() < deadline:
            time.sleep(0.1)
            descendants = launch.list_descendants([child.pid])

        assert len(descendants) == 1
    finally:
        for pid in launch.list_descendants([child.pid]):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_failing_run_exits_nonzero_and_cleans_up(tmp_path: Path) -> None:
    output_dir = tmp_path / "failing"

    # Valid values, so the run starts, but every client's example count is
    # above secagg-max-weight, so the clients fail round 1.
    completed = _run_launcher(
        output_dir,
        "num-server-rounds=1 secagg-max-weight=1",
        "--num-supernodes",
        TINY_SUPERNODES,
    )

    assert completed.returncode == launch.EXIT_FAILED, completed.stdout[-3000:]
    assert "superlink.log" in completed.stderr
    assert _results_status(output_dir) == "failed"
    _assert_nothing_left(output_dir)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_successful_tiny_run_exits_zero(tmp_path: Path) -> None:
    output_dir = tmp_path / "tiny"

    completed = _run_launcher(
        output_dir, TINY_RUN_CONFIG, "--num-supernodes", TINY_SUPERNODES
    )

    assert completed.returncode == launch.EXIT_OK, completed.stderr[-3000:]
    assert "round 1/1 acc=" in completed.stdout
    assert _results_status(output_dir) == "completed"
    _assert_nothing_left(output_dir)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_timeout_stops_run_and_cleans_up(tmp_path: Path) -> None:
    output_dir = tmp_path / "timeout"

    completed = _run_launcher(
        output_dir,
        "num-server-rounds=200 secure-aggregation=false",
        "--num-supernodes",
        TINY_SUPERNODES,
        "--timeout",
        "25",
    )

    assert completed.returncode == launch.EXIT_TIMEOUT, completed.stderr[-3000:]
    assert "did not finish within 25 s" in completed.stderr
    _assert_nothing_left(output_dir)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "inherited_sigint",
    [None, _ignore_sigint],
    ids=["sigint-default", "sigint-ignored"],
)
def test_interrupt_stops_run_and_cleans_up(
    tmp_path: Path, inherited_sigint: Callable[[], None] | None
) -> None:
    # A shell without job control starts background commands with SIGINT
    # ignored, and a child inherits that; the launcher must still stop.
    output_dir = tmp_path / "interrupted"
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--output-dir",
        str(output_dir),
        "--run-config",
        # Long enough that the run cannot finish before the signal arrives.
        "num-server-rounds=5000 secure-aggregation=false",
        "--num-supernodes",
        TINY_SUPERNODES,
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=inherited_sigint,
    )
    results_file = output_dir / "results.json"
    deadline = time.monotonic() + 120
    while not results_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    status_before = _results_status(output_dir)

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert results_file.exists()
    assert status_before == "running"
    assert process.returncode == launch.EXIT_INTERRUPTED, stderr[-3000:]
    document = json.loads(results_file.read_text())
    assert document["status"] == "failed"
    assert document["error"].startswith("Stopped by the launcher: Interrupted")
    _assert_nothing_left(output_dir)


def test_parse_run_config_rejects_unclosed_quote() -> None:
    with pytest.raises(launch.LaunchError, match="unclosed ' quote"):
        launch.parse_run_config(["output-dir='/tmp/a b"])


def test_too_few_supernodes_rejected_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "rejected"

    exit_code = launch.main(
        [str(APP_DIR), "--output-dir", str(output_dir), "--num-supernodes", "1"]
    )

    assert exit_code == launch.EXIT_USAGE
    error = capsys.readouterr().err
    assert "for 1 simulated SuperNodes (--num-supernodes)" in error
    assert "min-train-clients (min_available_nodes) 2 is above the 1 nodes" in error
    assert not output_dir.exists()


def test_distributed_target_rejected_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output_dir = tmp_path / "rejected"

    exit_code = launch.main(
        [
            str(APP_DIR),
            "--output-dir",
            str(output_dir),
            "--num-supernodes",
            "4",
            "--run-config",
            "dp-mode='distributed' target-epsilon=0.01",
        ]
    )

    assert exit_code == launch.EXIT_USAGE
    error = capsys.readouterr().err
    assert "for 4 simulated SuperNodes (--num-supernodes): target-epsilon 0.01" in error
    assert "is below 0.01949, the smallest epsilon" in error
    assert not output_dir.exists()


def test_earlier_audit_rejected_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Results are moved aside for a new launch, but an audit file is not:
    # the new run would append to it and replace the earlier run's models.
    output_dir = tmp_path / "earlier"
    output_dir.mkdir()
    (output_dir / "audit.json").write_text("{}")
    (output_dir / "results.json").write_text('{"status": "completed"}')

    exit_code = launch.main(
        [
            str(APP_DIR),
            "--output-dir",
            str(output_dir),
            "--run-config",
            "verification=true",
        ]
    )

    assert exit_code == launch.EXIT_USAGE
    assert "contains an earlier run's audit.json" in capsys.readouterr().err
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "audit.json",
        "results.json",
    ]


def test_node_count_reaches_only_checks_that_take_it(tmp_path: Path) -> None:
    first = _app_with_check(
        tmp_path / "first",
        "def check(run_config, num_nodes=None):\n"
        "    raise ValueError(f'nodes {num_nodes}')\n",
    )
    second = _app_with_check(
        tmp_path / "second", _CHECK.format("raise ValueError('no nodes asked')")
    )

    with pytest.raises(launch.LaunchError, match=r"^nodes 7$"):
        launch.check_run_config_values(
            first, _spec(tmp_path / "first"), {}, num_supernodes=7
        )
    with pytest.raises(launch.LaunchError, match=r"^no nodes asked$"):
        launch.check_run_config_values(
            second, _spec(tmp_path / "second"), {}, num_supernodes=7
        )


def _write_results(path: Path, status: str) -> None:
    path.write_text(json.dumps({"status": status, "rounds": []}), encoding="utf-8")


def _sleeper(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    )


def test_completed_run_gets_grace_after_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ServerApp wrote its outcome as the timeout fired; Flower ends the
    # run a moment later, so the run is not reported as timed out.
    monkeypatch.setattr(launch, "COMPLETION_GRACE_SECONDS", 20.0)
    results_file = tmp_path / "results.json"
    _write_results(results_file, "completed")
    process = _sleeper(0.3)

    assert launch.ends_after_completion(process, results_file)
    assert process.returncode == 0


@pytest.mark.parametrize("status", ["running", "failed", None])
def test_unfinished_run_gets_no_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str | None
) -> None:
    monkeypatch.setattr(launch, "COMPLETION_GRACE_SECONDS", 20.0)
    results_file = tmp_path / "results.json"
    if status is not None:
        _write_results(results_file, status)
    process = _sleeper(2.0)
    try:
        started = time.monotonic()

        assert not launch.ends_after_completion(process, results_file)
        assert time.monotonic() - started < 1.0
    finally:
        process.kill()
        process.wait()


def test_completed_run_that_hangs_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "COMPLETION_GRACE_SECONDS", 0.2)
    results_file = tmp_path / "results.json"
    _write_results(results_file, "completed")
    process = _sleeper(30.0)
    try:
        assert not launch.ends_after_completion(process, results_file)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_failed_run_still_running_marked_failed(tmp_path: Path) -> None:
    # The simulation engine can fail before the ServerApp runs its handlers,
    # so only the launcher can record that the run is over.
    results_file = tmp_path / "results.json"
    _write_results(results_file, "running")
    result = launch.LaunchResult(
        launch.EXIT_FAILED,
        run_id=7,
        run_status="finished:failed",
        results_status="running",
        message="Run 7: SuperLink status finished:failed.",
    )

    launch.record_unfinished_run(result, results_file)

    document = json.loads(results_file.read_text())
    assert document["status"] == "failed"
    assert "before the ServerApp recorded its outcome" in document["error"]
    assert "finished:failed" in document["error"]
    assert document["rounds"] == []
    assert result.results_status == "failed"
    assert result.message.endswith("The launcher marked results.json failed.")


@pytest.mark.parametrize(
    ("exit_code", "status"),
    [
        (launch.EXIT_FAILED, "failed"),
        (launch.EXIT_FAILED, "completed"),
        (launch.EXIT_OK, "completed"),
    ],
)
def test_recorded_outcome_left_alone(
    tmp_path: Path, exit_code: int, status: str
) -> None:
    results_file = tmp_path / "results.json"
    _write_results(results_file, status)
    before = results_file.read_text()
    result = launch.LaunchResult(exit_code, results_status=status, message="m")

    launch.record_unfinished_run(result, results_file)

    assert results_file.read_text() == before
    assert result.message == "m"


@pytest.mark.parametrize("exit_code", [launch.EXIT_TIMEOUT, launch.EXIT_INTERRUPTED])
def test_failure_caused_by_stop_names_the_stop(tmp_path: Path, exit_code: int) -> None:
    # Stopping the simulation kills its actors, and the ServerApp may then
    # record "too few clients" although the user interrupted the run.
    results_file = tmp_path / "results.json"
    stopped_at = time.time()
    results_file.write_text(
        json.dumps({"status": "failed", "error": "TooFewSurvivorsError: 0 of 3"})
    )
    os.utime(results_file, (stopped_at + 1, stopped_at + 1))
    result = launch.LaunchResult(exit_code, message="Interrupted; stopping.")

    launch.record_unfinished_run(result, results_file, stopped_at=stopped_at)

    document = json.loads(results_file.read_text())
    assert document["status"] == "failed"
    assert document["error"] == (
        "Stopped by the launcher: Interrupted; stopping. The ServerApp then "
        "recorded: TooFewSurvivorsError: 0 of 3"
    )


def test_failure_before_stop_left_alone(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    stopped_at = time.time()
    results_file.write_text(json.dumps({"status": "failed", "error": "bad model"}))
    os.utime(results_file, (stopped_at - 5, stopped_at - 5))
    before = results_file.read_text()
    result = launch.LaunchResult(launch.EXIT_INTERRUPTED, message="Interrupted.")

    launch.record_unfinished_run(result, results_file, stopped_at=stopped_at)

    assert results_file.read_text() == before
    assert result.results_status == "failed"


@pytest.mark.parametrize("exit_code", [launch.EXIT_TIMEOUT, launch.EXIT_FAILED])
def test_missing_results_written_as_failed(tmp_path: Path, exit_code: int) -> None:
    # A run stopped before the ServerApp started has no results.json.
    results_file = tmp_path / "results.json"
    result = launch.LaunchResult(exit_code, message="The SuperLink did not start.")

    launch.record_unfinished_run(result, results_file)

    document = json.loads(results_file.read_text())
    assert document == {
        "status": "failed",
        "error": "The ServerApp recorded no outcome: The SuperLink did not start.",
    }
    assert result.results_status == "failed"


def test_successful_run_without_results_left_alone(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"

    launch.record_unfinished_run(launch.LaunchResult(launch.EXIT_OK), results_file)

    assert not results_file.exists()


def test_earlier_results_moved_aside(tmp_path: Path) -> None:
    paths = launch.RunPaths(tmp_path)
    paths.results_file.write_text('{"status": "completed"}')
    paths.previous_results_file.write_text('{"status": "failed"}')
    echo = io.StringIO()

    launch._move_earlier_results(paths, echo)

    assert not paths.results_file.exists()
    assert paths.previous_results_file.read_text() == '{"status": "completed"}'
    assert "moved the earlier results.json to" in echo.getvalue()


def test_results_folder_not_moved(tmp_path: Path) -> None:
    paths = launch.RunPaths(tmp_path)
    paths.results_file.mkdir()

    with pytest.raises(launch.LaunchError, match=r"results\.json is not a file"):
        launch._move_earlier_results(paths, io.StringIO())

    assert paths.results_file.is_dir()


def test_unmovable_results_named(tmp_path: Path) -> None:
    paths = launch.RunPaths(tmp_path)
    paths.results_file.write_text('{"status": "completed"}')
    (paths.previous_results_file / "kept").mkdir(parents=True)

    with pytest.raises(
        launch.LaunchError,
        match=r"Cannot move the earlier .*results\.json to .*results\.previous\.json",
    ):
        launch._move_earlier_results(paths, io.StringIO())

    assert paths.results_file.read_text() == '{"status": "completed"}'


def test_output_dir_file_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "taken"
    output.write_text("not a folder")

    exit_code = launch.main([str(APP_DIR), "--output-dir", str(output)])

    assert exit_code == launch.EXIT_USAGE
    error = capsys.readouterr().err
    assert f"Cannot prepare the output folder {output}: " in error
    assert "Traceback" not in error


@pytest.mark.parametrize(
    "name", ["superlink.log", "superlink-console.log", "run.log", "launch.json"]
)
def test_folder_in_place_of_log_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # The launcher writes these after the SuperLink starts.
    (tmp_path / "logs" / name).mkdir(parents=True)

    exit_code = launch.main([str(APP_DIR), "--output-dir", str(tmp_path)])

    assert exit_code == launch.EXIT_USAGE
    error = capsys.readouterr().err
    assert f"{tmp_path / 'logs' / name} must be a file the launcher can write" in error
    assert "Traceback" not in error


def test_own_file_fifo_rejected_device_accepted(tmp_path: Path) -> None:
    paths = launch.RunPaths(tmp_path)
    paths.logs_dir.mkdir()
    paths.run_log.symlink_to("/dev/null")
    os.mkfifo(paths.launch_info)

    with pytest.raises(launch.LaunchError, match=r"launch\.json must be a file"):
        launch._check_own_files(paths)

    paths.launch_info.unlink()
    launch._check_own_files(paths)


def test_output_dir_symlink_loop_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")

    exit_code = launch.main([str(APP_DIR), "--output-dir", str(tmp_path / "loop1")])

    assert exit_code == launch.EXIT_USAGE
    assert "--output-dir cannot be resolved" in capsys.readouterr().err


def test_no_earlier_results_nothing_moved(tmp_path: Path) -> None:
    paths = launch.RunPaths(tmp_path)
    echo = io.StringIO()

    launch._move_earlier_results(paths, echo)

    assert not paths.previous_results_file.exists()
    assert echo.getvalue() == ""


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_timeout_during_startup_recorded(tmp_path: Path) -> None:
    # Two seconds end the run while the SuperLink starts or just after, so
    # the ServerApp has written nothing or only its running status.
    output_dir = tmp_path / "startup-timeout"
    # An earlier launch's outcome must not pass for this launch's.
    output_dir.mkdir()
    (output_dir / "results.json").write_text('{"status": "completed"}')

    completed = _run_launcher(
        output_dir,
        TINY_RUN_CONFIG,
        "--num-supernodes",
        TINY_SUPERNODES,
        "--timeout",
        "2",
    )

    assert completed.returncode == launch.EXIT_TIMEOUT, completed.stderr[-3000:]
    assert "did not finish within 2 s" in completed.stderr
    assert _results_status(output_dir) == "failed"
    previous = json.loads((output_dir / "results.previous.json").read_text())
    assert previous == {"status": "completed"}
    _assert_nothing_left(output_dir)
