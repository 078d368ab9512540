"""Experiments of the suite, and the loop that runs them with progress lines."""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"

ACCURACY = "accuracy"
COST = "cost"
SCALING = "scaling"
ATTACKS = "attacks"
FAMILIES = (ACCURACY, COST, SCALING, ATTACKS)


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One step of the suite.

    Attributes:
        family: One of ``FAMILIES``.
        name: Identifier, unique within the family.
        config: The exact configuration, recorded with the result.
        run: Runs the step and returns its JSON-serializable result.
        headline: Formats a one-line summary of a result for the progress
            output.
    """

    family: str
    name: str
    config: dict[str, Any]
    run: Callable[[], dict[str, Any]]
    headline: Callable[[dict[str, Any]], str] | None = None


class Progress:
    """Prints progress lines with the seconds since the suite started."""

    def __init__(
        self, stream: IO[str] = sys.stdout, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()

    @property
    def elapsed(self) -> float:
        """Seconds since this object was created."""
        return self._clock() - self._started

    def print(self, text: str) -> None:
        """Print one line prefixed with the elapsed time."""
        print(f"[suite {format_duration(self.elapsed)}] {text}", file=self._stream)
        self._stream.flush()


def format_duration(seconds: float) -> str:
    """Format seconds as ``m:ss`` (or ``h:mm:ss`` from one hour on)."""
    whole = math.floor(seconds)
    hours, remainder = divmod(whole, 3600)
    minutes, secs = divmod(remainder, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def run_experiments(
    experiments: Sequence[Experiment], progress: Progress
) -> Iterator[dict[str, Any]]:
    """Run every experiment in order and yield one entry per experiment.

    A failing experiment is yielded as ``failed`` with its error, and the
    others still run, so one broken configuration does not cost the results
    of a long run. ``KeyboardInterrupt`` propagates to the caller, which keeps
    the entries yielded so far.

    Args:
        experiments: The steps, in the order to run them.
        progress: Receives a line when each step starts and ends.

    Yields:
        Entries with the step's own result, then the family, name, status,
        configuration and wall time.
    """
    total = len(experiments)
    for index, experiment in enumerate(experiments, start=1):
        label = f"experiment {index}/{total} {experiment.family}/{experiment.name}"
        progress.print(f"{label}: started")
        entry = _run_one(experiment)
        progress.print(f"{label}: {_outcome_line(experiment, entry)}")
        yield entry


def _run_one(experiment: Experiment) -> dict[str, Any]:
    started = time.monotonic()
    # Any error of one experiment is caught so that the others still run. The
    # error is printed and recorded, and the suite then exits non-zero.
    try:
        result = experiment.run()
        status = STATUS_COMPLETED
    except Exception as error:
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
        status = STATUS_FAILED
    # The suite's own fields come last, so a result can never overwrite them.
    return {
        **result,
        "family": experiment.family,
        "name": experiment.name,
        "status": status,
        "config": experiment.config,
        "wall_time_s": round(time.monotonic() - started, 2),
    }


def _outcome_line(experiment: Experiment, entry: dict[str, Any]) -> str:
    duration = format_duration(entry["wall_time_s"])
    if entry["status"] != STATUS_COMPLETED:
        return f"FAILED after {duration}: {entry.get('error')}"
    if experiment.headline is None:
        return f"done in {duration}"
    return f"done in {duration}; {experiment.headline(entry)}"


def json_safe(value: Any) -> Any:
    """Return a copy of ``value`` with tuples as lists and non-finite floats as None.

    ``math.inf`` stands for "no DP" in the attack settings, and strict JSON
    has no infinity or NaN.
    """
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
