"""Peak memory of this process and of the processes it started, from Linux /proc.

``MemorySampler`` reads ``/proc/<pid>/status`` of this process and of every
descendant (for an in-process Flower simulation: Ray's GCS server, raylet and
worker processes) from a background thread, and keeps the peaks:

- ``main_peak_rss_bytes``: the largest ``VmRSS`` of this process seen in a
  sample, and ``main_hwm_bytes``, the kernel's own ``VmHWM`` peak, which
  misses no short spike. The sampler resets ``VmHWM`` through
  ``/proc/self/clear_refs`` when it starts (Linux 4.0 and later). Where the
  reset fails, ``main_hwm_bytes`` is None, because the kernel value would also
  cover everything before the sampler started.
- ``descendants_peak_rss_bytes``: the largest sum of ``VmRSS`` over all
  descendants in one sample. Pages shared between processes, such as Ray's
  object store in /dev/shm, count once per process that maps them, so the
  sum can exceed the memory in use. ``descendants_peak_anon_bytes`` sums
  ``RssAnon`` in the same way: resident anonymous memory, which leaves out
  file-backed and shared-memory pages.
- ``ray_workers_peak_rss_bytes``: the same sum over the descendants whose
  command line starts with ``ray::``, without the GCS server, raylet and
  Python helpers. With Ray 2.55 these are the worker and actor processes
  (``ray::ClientAppActor`` in a Flower simulation) and two agents,
  ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``.
- ``system_used_peak_bytes``: the largest ``MemTotal - MemAvailable`` of
  /proc/meminfo, which includes every other process on the machine.

Samples are ``interval`` seconds apart, so a descendant's peak that lasts
less than that can be missed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from fedsec_flwr.launch import list_descendants

PROC = Path("/proc")
KIB = 1024
DEFAULT_INTERVAL_SECONDS = 0.2
RAY_PROCESS_PREFIX = b"ray::"
# Writing "5" to /proc/<pid>/clear_refs resets the VmHWM peak to the current RSS
# (Linux 4.0 and later, see proc_pid_clear_refs(5)).
RESET_PEAK_RSS = "5"


@dataclass(frozen=True)
class ProcessMemory:
    """Memory fields of one process's /proc/<pid>/status, in bytes."""

    rss: int
    hwm: int
    anon: int


@dataclass
class MemoryPeaks:
    """Peaks that ``MemorySampler`` records, in bytes, and how it sampled them."""

    main_peak_rss_bytes: int = 0
    main_hwm_bytes: int | None = None
    descendants_peak_rss_bytes: int = 0
    descendants_peak_anon_bytes: int = 0
    descendants_max_processes: int = 0
    ray_workers_peak_rss_bytes: int = 0
    system_used_start_bytes: int | None = None
    system_used_peak_bytes: int | None = None
    samples: int = 0
    interval_s: float = DEFAULT_INTERVAL_SECONDS

    def as_dict(self) -> dict[str, object]:
        """Return the peaks as a JSON object."""
        return asdict(self)


def read_process_memory(pid: int) -> ProcessMemory | None:
    """Read VmRSS, VmHWM and RssAnon of ``pid``, or None if it has exited.

    Kernel threads have no such fields and count as zero.
    """
    try:
        text = (PROC / str(pid) / "status").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = _kib_fields(text.splitlines(), ("VmRSS:", "VmHWM:", "RssAnon:"))
    return ProcessMemory(
        rss=fields.get("VmRSS:", 0),
        hwm=fields.get("VmHWM:", 0),
        anon=fields.get("RssAnon:", 0),
    )


def read_system_used() -> int | None:
    """Return ``MemTotal - MemAvailable`` of /proc/meminfo in bytes."""
    try:
        text = (PROC / "meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = _kib_fields(text.splitlines(), ("MemTotal:", "MemAvailable:"))
    if len(fields) != 2:
        return None
    return fields["MemTotal:"] - fields["MemAvailable:"]


def _kib_fields(lines: Iterable[str], names: tuple[str, ...]) -> dict[str, int]:
    """Return the named ``Name:  123 kB`` fields of /proc text in bytes."""
    found: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names:
            found[parts[0]] = int(parts[1]) * KIB
    return found


def is_ray_process(pid: int) -> bool:
    """Return whether the command line of ``pid`` starts with ``ray::``."""
    try:
        command_line = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return command_line.startswith(RAY_PROCESS_PREFIX)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS; return whether it worked."""
    try:
        (PROC / "self" / "clear_refs").write_text(RESET_PEAK_RSS, encoding="utf-8")
    except OSError:
        return False
    return True


class MemorySampler:
    """Context manager that samples memory in a background thread until exit.

    Use one sampler per measured section::

        with MemorySampler() as sampler:
            run_simulation(...)
        peaks = sampler.peaks
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be above 0 seconds. Found {interval}.")
        self.interval = interval
        self.peaks = MemoryPeaks(interval_s=interval)
        self._pid = os.getpid()
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="memory-sampler", daemon=True
        )

    def __enter__(self) -> MemorySampler:
        self._hwm_reset = reset_peak_rss()
        self.peaks.system_used_start_bytes = read_system_used()
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self._hwm_reset:
            own = read_process_memory(self._pid)
            self.peaks.main_hwm_bytes = own.hwm if own is not None else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read the memory of this process and its descendants once."""
        peaks = self.peaks
        own = read_process_memory(self._pid)
        if own is not None:
            peaks.main_peak_rss_bytes = max(peaks.main_peak_rss_bytes, own.rss)

        rss = anon = ray_rss = processes = 0
        for pid in list_descendants([self._pid]):
            memory = read_process_memory(pid)
            if memory is None:
                continue
            processes += 1
            rss += memory.rss
            anon += memory.anon
            if is_ray_process(pid):
                ray_rss += memory.rss
        peaks.descendants_peak_rss_bytes = max(peaks.descendants_peak_rss_bytes, rss)
        peaks.descendants_peak_anon_bytes = max(peaks.descendants_peak_anon_bytes, anon)
        peaks.descendants_max_processes = max(
            peaks.descendants_max_processes, processes
        )
        peaks.ray_workers_peak_rss_bytes = max(
            peaks.ray_workers_peak_rss_bytes, ray_rss
        )

        used = read_system_used()
        if used is not None:
            peaks.system_used_peak_bytes = max(peaks.system_used_peak_bytes or 0, used)
        peaks.samples += 1
