"""The machine, the code and the load that every suite result records."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from benchmarks.common import REPOSITORY_ROOT, git_commit, machine_info

GIT_TIMEOUT_SECONDS = 10.0


def environment_record() -> dict[str, Any]:
    """Return the machine, the commit and the load at the time of the call.

    ``commit`` is the checked-out commit. ``tracked_changes`` and
    ``untracked_files`` say whether the work tree differs from it, in which
    case the measured code is not exactly that commit.
    """
    return {
        "machine": machine_info(),
        "commit": {**git_commit(), "untracked_files": _has_untracked_files()},
        "load_average": load_average(),
        "recorded_at": utc_timestamp(),
    }


def load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where unsupported.

    Other jobs on a shared machine slow every timed step, so the suite
    records the load next to its times.
    """
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def utc_timestamp() -> str:
    """Return the current UTC time in ISO 8601 form, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def short_commit(environment: dict[str, Any]) -> str:
    """Return a one-line description of the commit in an environment record."""
    commit = environment.get("commit", {})
    head = commit.get("commit") or "unknown commit"
    changes = []
    if commit.get("tracked_changes"):
        changes.append("tracked changes")
    if commit.get("untracked_files"):
        changes.append("untracked files")
    if not changes:
        return str(head)
    return f"{head} (work tree with {' and '.join(changes)})"


def _has_untracked_files() -> bool | None:
    try:
        completed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=normal"],
            cwd=REPOSITORY_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=GIT_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return any(line.startswith("??") for line in completed.stdout.splitlines())
