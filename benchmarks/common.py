"""Facts about the machine and the code that a benchmark result records."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
CPUINFO_PATH = Path("/proc/cpuinfo")
MEMINFO_PATH = Path("/proc/meminfo")
KIB = 1024
GIB = 1024**3
RECORDED_PACKAGES = ("flwr", "numpy", "cryptography", "ray")


def machine_info() -> dict[str, object]:
    """Return the CPU model, logical cores, memory and software versions."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _package_version(name) for name in RECORDED_PACKAGES},
    }


def git_commit() -> dict[str, object]:
    """Return the checked-out commit and whether the work tree has changes.

    A benchmark run from a modified work tree measures code that no commit
    contains, so the result records that too.
    """
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": head.strip() if head is not None else None,
        "tracked_changes": bool(status.strip()) if status is not None else None,
    }


def _git(*args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *args],
            cwd=REPOSITORY_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout


def _cpu_model() -> str:
    try:
        for line in CPUINFO_PATH.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in MEMINFO_PATH.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * KIB / GIB, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
