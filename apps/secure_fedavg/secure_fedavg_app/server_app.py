"""ServerApp: build the strategy from the run config, run it, record results."""

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import fedsec_flwr
from fedsec_flwr import RoundReport
from fedsec_flwr.dp import TargetEpsilonUnreachableError
from fedsec_flwr.files import write_atomically
from fedsec_flwr.privacy import DPMode, NoiseHeadroomError
from secure_fedavg_app.data import DatasetSplit, load_dataset_cached
from secure_fedavg_app.models import build_model, count_parameters
from secure_fedavg_app.results import (
    STATUS_COMPLETED,
    STATUS_FAILED,
    ResultsFile,
    collect_run_info,
    format_round_line,
    round_entry,
)
from secure_fedavg_app.settings import AppSettings
from secure_fedavg_app.strategy_factory import (
    STRATEGY_NAME,
    build_strategy,
    explain_noise_headroom,
    explain_unreachable_target,
    name_run_config_keys,
)
from secure_fedavg_app.task import evaluate, seed_everything, use_single_thread

PACKAGE_LOGGER_NAME = "fedsec_flwr"
STRATEGY_LOGGER_NAME = f"{PACKAGE_LOGGER_NAME}.strategy"

logger = logging.getLogger(f"{PACKAGE_LOGGER_NAME}.apps.secure_fedavg")

# Used only when the run config has no usable output-dir, so that even a run
# with an invalid config leaves a results.json that records the failure.
FALLBACK_OUTPUT_DIR = "outputs/secure_fedavg"

AUDIT_FILE_NAME = "audit.json"
"""File next to results.json with each verified round's transcript."""

FINAL_MODEL_FILE_NAME = "final_model.npz"
INITIAL_MODEL_FILE_NAME = "initial_model.npz"
"""File next to results.json with the final global model's arrays."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run all rounds and keep ``results.json`` current after each one.

    Raises:
        Exception: Whatever the settings, the data or the strategy raise. The
            results file is marked ``failed`` first, so the run ends failed.
    """
    run_config = dict(context.run_config)
    output_dir = _output_dir(run_config)
    results = ResultsFile(
        output_dir, run_config=run_config, run_info=collect_run_info(_source_dir())
    )
    results.start()
    print(f"results file: {results.path.resolve()}", flush=True)

    try:
        _run(grid, run_config, results)
    except BaseException as error:
        results.finish(STATUS_FAILED, error=f"{type(error).__name__}: {error}")
        logger.error("Run failed: %s: %s", type(error).__name__, error)
        raise

    results.finish(STATUS_COMPLETED)
    print(f"run completed; results in {results.path.resolve()}", flush=True)


def _run(grid: Grid, run_config: Mapping[str, Any], results: ResultsFile) -> None:
    settings = AppSettings.from_run_config(run_config)
    check_no_earlier_audit(results.path.parent)
    use_single_thread()
    seed_everything(settings.seed)

    split = load_dataset_cached(settings.dataset, settings.seed)
    model = build_model(
        settings.dataset, dp_sgd=settings.dp_sgd, hidden_units=settings.hidden_units
    )
    initial_arrays = ArrayRecord(model.state_dict())
    # With the audit file, the initial model lets an auditor follow the run.
    _save_model(initial_arrays, results.path.parent / INITIAL_MODEL_FILE_NAME)

    def on_round_end(report: RoundReport) -> None:
        entry = round_entry(report)
        results.add_round(entry)
        print(format_round_line(entry, settings.num_server_rounds), flush=True)

    strategy = build_strategy(
        settings, on_round_end, audit_path=results.path.parent / AUDIT_FILE_NAME
    )
    results.update(
        strategy=STRATEGY_NAME,
        secure_aggregation=settings.secure_aggregation,
        model_parameters=count_parameters(model),
        num_train_examples=len(split.y_train),
        num_test_examples=len(split.y_test),
    )

    try:
        with _run_config_names_in(logging.getLogger(STRATEGY_LOGGER_NAME)):
            result = strategy.start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=settings.num_server_rounds,
                evaluate_fn=make_central_evaluate(
                    settings.dataset,
                    split,
                    dp_sgd=settings.dp_sgd,
                    hidden_units=settings.hidden_units,
                ),
            )
    except TargetEpsilonUnreachableError as error:
        raise ValueError(explain_unreachable_target(error, settings)) from error
    except NoiseHeadroomError as error:
        raise ValueError(explain_noise_headroom(error, settings)) from error
    except ValueError as error:
        # Checks that need the connected nodes, such as the Poisson sample
        # size, run in round 1 and name the library's parameters. Subclasses
        # such as TooFewSurvivorsError keep their type and message.
        if type(error) is not ValueError:
            raise
        raise ValueError(name_run_config_keys(str(error))) from error

    _save_model(result.arrays, results.path.parent / FINAL_MODEL_FILE_NAME)
    if strategy.stopped_reason is not None:
        # The privacy budget ended the run early: a planned outcome, not a failure.
        results.update(stopped_reason=strategy.stopped_reason)
        print(strategy.stopped_reason, flush=True)
        return
    _check_all_rounds_reported(results, settings.num_server_rounds)


def check_run_config(
    run_config: Mapping[str, Any], num_nodes: int | None = None
) -> None:
    """Check a whole run config as ``main`` does, without running anything.

    ``python -m fedsec_flwr.launch`` calls it before it starts the SuperLink,
    so a bad value fails in about a second instead of after the start-up. It
    parses the settings, builds the strategy and calibrates central DP's
    noise for its target, with the package's log messages below ERROR held
    back (the ServerApp logs them again).

    With ``num_nodes``, the number of simulated SuperNodes, it first checks
    that they can run the rounds (``SecureFedAvg.check_node_count``), then
    plans a distributed DP round for the clients a round samples from them
    (the expected number under Poisson sampling, so a sample of another
    size can still fail near the limit). Without it, distributed DP's noise
    is checked only in round 1.

    Raises:
        ValueError: If a value or a combination is invalid; the message names
            the run-config keys.
    """
    settings = AppSettings.from_run_config(run_config)
    check_no_earlier_audit(_output_dir(run_config))
    nodes = f" for {num_nodes} simulated SuperNodes (--num-supernodes)"
    # The output folder may not exist yet; the audit file is never written here.
    with _quiet_package_logger(), tempfile.TemporaryDirectory() as folder:
        strategy = build_strategy(
            settings, _ignore_report, audit_path=Path(folder) / AUDIT_FILE_NAME
        )
        if num_nodes is not None:
            try:
                strategy.check_node_count(num_nodes, settings.num_server_rounds)
            except ValueError as error:
                raise ValueError(
                    f"Invalid run config{nodes}: {name_run_config_keys(str(error))}"
                ) from error

        arrays = _arrays_for_privacy_check(settings, num_nodes)
        # Only distributed DP's check depends on the nodes.
        context = nodes if arrays is not None else ""
        try:
            strategy.check_privacy_target(
                settings.num_server_rounds, num_nodes=num_nodes, initial_arrays=arrays
            )
        except TargetEpsilonUnreachableError as error:
            raise ValueError(
                f"Invalid run config{context}: "
                f"{explain_unreachable_target(error, settings)}"
            ) from error
        except NoiseHeadroomError as error:
            raise ValueError(
                f"Invalid run config{context}: "
                f"{explain_noise_headroom(error, settings)}"
            ) from error
        except ValueError as error:
            raise ValueError(
                f"Invalid run config{context}: {name_run_config_keys(str(error))}"
            ) from error


def _arrays_for_privacy_check(
    settings: AppSettings, num_nodes: int | None
) -> ArrayRecord | None:
    """Return the model's arrays where the DP check needs the model's size.

    Distributed DP's noise depends on the size, so it is checked only with
    the number of nodes; central DP's is not.
    """
    if num_nodes is None or settings.dp_mode != DPMode.DISTRIBUTED.value:
        return None
    model = build_model(
        settings.dataset, dp_sgd=settings.dp_sgd, hidden_units=settings.hidden_units
    )
    return ArrayRecord(model.state_dict())


@contextlib.contextmanager
def _quiet_package_logger() -> Iterator[None]:
    package_logger = logging.getLogger(PACKAGE_LOGGER_NAME)
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package_logger.setLevel(level)


@contextlib.contextmanager
def _run_config_names_in(target: logging.Logger) -> Iterator[None]:
    names = _RunConfigNames()
    target.addFilter(names)
    try:
        yield
    finally:
        target.removeFilter(names)


class _RunConfigNames(logging.Filter):
    """Name the run-config key before each library parameter in a record.

    Warnings that the strategy logs during the rounds, such as a changed
    Poisson sample-size chance, name its parameters (``fraction_train``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = name_run_config_keys(record.getMessage())
        record.args = None
        return True


def _ignore_report(report: RoundReport) -> None:
    del report


def make_central_evaluate(
    dataset: str, split: DatasetSplit, *, dp_sgd: bool = False, hidden_units: int = 0
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Return an ``evaluate_fn`` that scores the global model on the test split.

    Args:
        dataset: Dataset name, which selects the model architecture.
        split: Loaded dataset; only its test arrays are used.
        dp_sgd: Build the DP-SGD compatible variant of the model.
        hidden_units: Width of the model's hidden layer, 0 for the default.

    Returns:
        A function of ``(server_round, arrays)`` that returns a MetricRecord
        with ``accuracy`` (fraction) and ``loss`` (mean cross-entropy, nats).
    """
    model = build_model(dataset, dp_sgd=dp_sgd, hidden_units=hidden_units)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, split.x_test, split.y_test)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    return central_evaluate


def _save_model(arrays: ArrayRecord, path: Path) -> None:
    named: dict[str, Any] = {key: array.numpy() for key, array in arrays.items()}
    write_atomically(path, lambda stream: np.savez(stream, **named))


def check_no_earlier_audit(output_dir: Path) -> None:
    """Reject an output folder that contains an earlier run's audit file.

    A new run would add its rounds to that file and replace the model files
    that auditing the earlier run needs.

    Raises:
        ValueError: If ``audit.json`` exists in ``output_dir``.

    """
    audit_path = output_dir / AUDIT_FILE_NAME
    if os.path.lexists(audit_path):
        raise ValueError(
            f"The output folder {str(output_dir)!r} contains an earlier run's "
            f"{AUDIT_FILE_NAME}. A new run would add its rounds to it and replace "
            f"{INITIAL_MODEL_FILE_NAME} and {FINAL_MODEL_FILE_NAME}, which auditing "
            "the earlier run needs. Move these files away or choose another "
            "output-dir."
        )


def _check_all_rounds_reported(results: ResultsFile, num_rounds: int) -> None:
    num_reported = len(results.document["rounds"])
    if num_reported != num_rounds:
        raise RuntimeError(
            f"The strategy reported {num_reported} of {num_rounds} rounds; "
            "a round that ends without a report did not complete."
        )


def _output_dir(run_config: Mapping[str, Any]) -> Path:
    value = run_config.get("output-dir")
    if isinstance(value, str) and value:
        return Path(value)
    return Path(FALLBACK_OUTPUT_DIR)


def _source_dir() -> Path | None:
    # The app itself runs from an unpacked copy without git metadata, so the
    # commit is read from the checkout that provides the fedsec_flwr package.
    package_file = getattr(fedsec_flwr, "__file__", None)
    if package_file is None:
        return None
    return Path(package_file).resolve().parent.parent
