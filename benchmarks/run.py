"""Run the evaluation suite: accuracy, cost, scaling and privacy attacks.

Run from the repository root::

    python -m benchmarks.run --quick --out outputs/eval-quick
    python -m benchmarks.run --out outputs/eval-full
    python -m benchmarks.run --quick --only cost,scaling --out outputs/eval-cost
    python -m benchmarks.run --only accuracy --datasets fashion-mnist --out DIR

``--smoke`` runs the smallest settings (a check that every step works),
``--quick`` a short version of each experiment, and the default the full
settings. The output folder receives ``results.json`` (every result with
the machine, the commit and its exact configuration), the PNG plots and
``report.md``. ``results.json`` is rewritten after every experiment, so an
interrupted run keeps what it measured. Accuracy runs and cost points keep
their logs under ``<out>/runs``.

The exit status is 0 when every experiment completed, 1 when one failed
(the others still run and the report lists the failure), 2 for invalid
arguments and 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPOSITORY_ROOT
from benchmarks.suite import accuracy, cost, privacy_attacks, report, scaling
from benchmarks.suite.experiment import (
    ACCURACY,
    ATTACKS,
    COST,
    FAMILIES,
    SCALING,
    STATUS_COMPLETED,
    STATUS_FAILED,
    Experiment,
    Progress,
    json_safe,
    run_experiments,
)
from benchmarks.suite.machine import environment_record, load_average, utc_timestamp
from benchmarks.suite.profiles import FULL, PROFILES, QUICK, SMOKE, Profile

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_APP_DIR = REPOSITORY_ROOT / "apps" / "secure_fedavg"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
STATUS_RUNNING = "running"
STATUS_INTERRUPTED = "interrupted"


def parse_families(text: str | None) -> tuple[str, ...]:
    """Parse the ``--only`` list; None selects every family.

    Raises:
        ValueError: If a name is not one of ``FAMILIES`` or the list is empty.
    """
    if text is None:
        return FAMILIES
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise ValueError(
            f"--only must be a comma-separated list of {', '.join(FAMILIES)}. "
            f"Found {text!r}."
        )
    return tuple(family for family in FAMILIES if family in names)


def select_datasets(profile: Profile, text: str | None) -> Profile:
    """Keep only the accuracy datasets named in ``text``; None keeps all.

    Raises:
        ValueError: If a name is not a dataset of the profile or the list is
            empty.
    """
    if text is None:
        return profile
    available = [plan.dataset for plan in profile.accuracy]
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(
            f"--datasets must be a comma-separated list of the {profile.name} "
            f"profile's datasets {', '.join(available)}. Found {text!r}."
        )
    kept = tuple(plan for plan in profile.accuracy if plan.dataset in names)
    return dataclasses.replace(profile, accuracy=kept)


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="profile",
        action="store_const",
        const=QUICK,
        help="short settings, about 10 minutes on 2 cores",
    )
    size.add_argument(
        "--smoke",
        dest="profile",
        action="store_const",
        const=SMOKE,
        help="smallest settings, a check that every step runs",
    )
    parser.set_defaults(profile=FULL)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for results.json, report.md, the plots and run logs",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated families to run (default: all of {','.join(FAMILIES)})",
    )
    parser.add_argument(
        "--datasets",
        default=None,
        help="comma-separated datasets of the accuracy runs (default: all)",
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        default=DEFAULT_APP_DIR,
        help="Flower app of the accuracy runs (default: apps/secure_fedavg)",
    )
    return parser


def plan_suite(
    profile: Profile, families: Sequence[str], *, app_dir: Path, out_dir: Path
) -> tuple[list[Experiment], list[dict[str, Any]]]:
    """Return the experiments of the selected families and the skipped runs."""
    experiments: list[Experiment] = []
    skipped: list[dict[str, Any]] = []
    runs_dir = out_dir / "runs"
    if ACCURACY in families:
        planned, skipped = accuracy.plan_experiments(
            profile, app_dir=app_dir, runs_dir=runs_dir / "accuracy"
        )
        experiments.extend(planned)

    requests: list[tuple[str, list[cost.Point]]] = []
    if COST in families:
        requests.append((COST, cost.cost_points(profile.cost)))
    if SCALING in families:
        for points in scaling.axis_points(profile.scaling).values():
            requests.append((SCALING, points))
    experiments.extend(
        cost.plan_experiments(
            cost.unique_points(requests),
            runs_dir=runs_dir / "points",
            timeout=profile.point_timeout_s,
        )
    )

    if ATTACKS in families:
        experiments.extend(
            privacy_attacks.plan_experiments(profile.attacks, out_dir=out_dir)
        )
    return experiments, skipped


def summarize_families(
    entries: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    *,
    profile: Profile,
    families: Sequence[str],
    out_dir: Path,
    environment: dict[str, Any],
) -> dict[str, Any]:
    """Build the section of each selected family, writing its plots."""
    recorded = {key: environment[key] for key in ("machine", "commit")}
    by_family = {
        family: [e for e in entries if e["family"] == family] for family in FAMILIES
    }
    sections: dict[str, Any] = {}
    if ACCURACY in families:
        sections[ACCURACY] = accuracy.summarize(
            by_family[ACCURACY],
            skipped,
            profile=profile,
            out_dir=out_dir,
            environment=recorded,
        )
    if COST in families:
        sections[COST] = cost.summarize(
            entries,
            by_family[ACCURACY],
            plan=profile.cost,
            out_dir=out_dir,
            environment=recorded,
        )
    if SCALING in families:
        sections[SCALING] = scaling.summarize(
            entries, plan=profile.scaling, out_dir=out_dir, environment=recorded
        )
    if ATTACKS in families:
        sections[ATTACKS] = privacy_attacks.summarize(
            by_family[ATTACKS], out_dir=out_dir, environment=recorded
        )
    return sections


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as strict JSON, through a temporary file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(
        json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    temporary.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        families = parse_families(args.only)
        profile = select_datasets(PROFILES[args.profile], args.datasets)
    except ValueError as error:
        parser.error(str(error))
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )

    progress = Progress()
    environment = environment_record()
    experiments, skipped = plan_suite(
        profile, families, app_dir=args.app_dir.resolve(), out_dir=out_dir
    )
    suite: dict[str, Any] = {
        "profile": profile.name,
        "command": command,
        "families": list(families),
        "started_at": environment["recorded_at"],
        "notes": list(profile.notes),
        "status": STATUS_RUNNING,
    }
    _print_plan(progress, experiments, skipped, out_dir)

    interrupted = False
    entries: list[dict[str, Any]] = []
    try:
        for entry in run_experiments(experiments, progress):
            entries.append(entry)
            partial = {"suite": suite, "environment": environment}
            write_json(out_dir / RESULTS_FILE, {**partial, "experiments": entries})
    except KeyboardInterrupt:
        interrupted = True
        progress.print("interrupted; writing the results measured so far")

    failures = [e for e in entries if e["status"] == STATUS_FAILED]
    suite.update(
        {
            "finished_at": utc_timestamp(),
            "wall_time_s": round(progress.elapsed, 1),
            "status": _suite_status(interrupted, failures),
            "num_experiments": len(experiments),
            "num_completed": sum(e["status"] == STATUS_COMPLETED for e in entries),
            "num_failed": len(failures),
            "num_skipped": len(skipped),
        }
    )
    document: dict[str, Any] = {
        "suite": suite,
        "environment": environment,
        "environment_end": {
            "load_average": load_average(),
            "recorded_at": utc_timestamp(),
        },
        "failures": failures,
        **summarize_families(
            entries,
            skipped,
            profile=profile,
            families=families,
            out_dir=out_dir,
            environment=environment,
        ),
        "experiments": [*entries, *skipped],
    }
    write_json(out_dir / RESULTS_FILE, document)
    (out_dir / REPORT_FILE).write_text(
        report.render_report(json_safe(document)), encoding="utf-8"
    )
    progress.print(
        f"wrote {out_dir / RESULTS_FILE} and {out_dir / REPORT_FILE}; "
        f"{suite['num_completed']} completed, {len(failures)} failed, "
        f"{len(skipped)} skipped"
    )
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures else EXIT_OK


def _suite_status(interrupted: bool, failures: Sequence[dict[str, Any]]) -> str:
    if interrupted:
        return STATUS_INTERRUPTED
    return STATUS_FAILED if failures else STATUS_COMPLETED


def _print_plan(
    progress: Progress,
    experiments: Sequence[Experiment],
    skipped: Sequence[dict[str, Any]],
    out_dir: Path,
) -> None:
    counts = {
        family: sum(e.family == family for e in experiments) for family in FAMILIES
    }
    listed = ", ".join(f"{family} {count}" for family, count in counts.items() if count)
    progress.print(f"{len(experiments)} experiments ({listed}); output in {out_dir}")
    for entry in skipped:
        progress.print(f"skipping {entry['family']}/{entry['name']}: {entry['reason']}")


if __name__ == "__main__":
    sys.exit(main())
