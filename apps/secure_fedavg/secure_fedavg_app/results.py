"""The ``results.json`` file of a run, rewritten atomically after every round."""

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsec_flwr import RoundReport
from fedsec_flwr.files import write_text_atomically

RESULTS_FILENAME = "results.json"
STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"

_GIT_TIMEOUT_SECONDS = 2.0


def round_entry(report: RoundReport) -> dict[str, Any]:
    """Convert a round report into the JSON object stored under ``rounds``.

    The named keys come first; every other field of the report is kept under
    its own name, so new report fields reach the file unchanged.
    """
    entry: dict[str, Any] = {
        "round": report.server_round,
        "accuracy": report.evaluate_metrics.get("accuracy"),
        "loss": report.evaluate_metrics.get("loss"),
        "num_sampled": report.num_sampled,
        "num_aggregated": report.num_aggregated,
        "num_dropped": report.num_dropped,
        "dropped_by_stage": dict(report.dropped_by_stage),
        "seconds": report.seconds,
        "upload_bytes_per_client": _bytes_by_node(report.upload_bytes),
        "download_bytes_per_client": _bytes_by_node(report.download_bytes),
        "clipped_coordinates": report.clipped_coordinates,
        "train_metrics": dict(report.train_metrics),
        "evaluate_metrics": dict(report.evaluate_metrics),
    }

    renamed = {"server_round", "upload_bytes", "download_bytes"}
    for field in dataclasses.fields(report):
        if field.name not in entry and field.name not in renamed:
            entry[field.name] = _to_json_value(getattr(report, field.name))

    return entry


def _finite_json(value: Any) -> Any:
    """Return ``value`` with each NaN or infinite float replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def format_round_line(entry: Mapping[str, Any], num_rounds: int) -> str:
    """Format the one-line progress summary of a round entry."""
    accuracy = entry.get("accuracy")
    loss = entry.get("loss")
    accuracy_text = "n/a" if accuracy is None else f"{accuracy:.3f}"
    loss_text = "n/a" if loss is None else f"{loss:.3f}"
    return (
        f"round {entry['round']}/{num_rounds} acc={accuracy_text} loss={loss_text} "
        f"clients={entry['num_aggregated']} dropped={entry['num_dropped']} "
        f"{entry['seconds']:.2f} s"
    )


class ResultsFile:
    """Results of one run, written to ``<output_dir>/results.json``.

    Every update rewrites the whole file through a temporary file in the same
    folder and ``os.replace``, so readers never see a partial file.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        run_config: Mapping[str, Any],
        run_info: Mapping[str, Any],
    ) -> None:
        self.path = output_dir / RESULTS_FILENAME
        self._document: dict[str, Any] = {
            "status": STATUS_RUNNING,
            "error": None,
            "run_config": dict(run_config),
            "run_info": dict(run_info),
            "started_at": _utc_timestamp(),
            "finished_at": None,
            "rounds": [],
        }

    @property
    def document(self) -> dict[str, Any]:
        """Current content of the file, as a dict."""
        return self._document

    def start(self) -> None:
        """Create the output folder and write the initial ``running`` state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def add_round(self, entry: Mapping[str, Any]) -> None:
        """Append one round entry and rewrite the file."""
        self._document["rounds"].append(dict(entry))
        self._write()

    def update(self, **fields: Any) -> None:
        """Set top-level fields and rewrite the file."""
        self._document.update(fields)
        self._write()

    def finish(self, status: str, error: str | None = None) -> None:
        """Record the final status (and the error of a failed run)."""
        self.update(status=status, error=error, finished_at=_utc_timestamp())

    def _write(self) -> None:
        # JSON has no NaN or infinity, so such numbers are written as null.
        document = _finite_json(self._document)
        text = json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n"
        write_text_atomically(self.path, text)


def collect_run_info(source_dir: Path | None) -> dict[str, Any]:
    """Return host, Python and package versions and the git commit, if cheap."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "packages": _package_versions(),
        "git_commit": None,
    }
    if source_dir is not None:
        info["git_commit"] = _git_commit(source_dir)
    return info


def _package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in ("flwr", "torch", "numpy", "scikit-learn", "fedsec_flwr"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit(source_dir: Path) -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(source_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip() or None


def _bytes_by_node(values: Mapping[int, int]) -> dict[str, int]:
    return {str(node_id): int(count) for node_id, count in values.items()}


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json_value(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_to_json_value(item) for item in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return repr(value)


def _utc_timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
