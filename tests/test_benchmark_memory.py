"""The memory sampler of the benchmarks, against real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.memory import (
    MemorySampler,
    _kib_fields,
    read_process_memory,
    read_system_used,
)

KIB = 1024
MIB = 1024**2
CHILD_BYTES = 64 * MIB
# The child writes every byte, so all of it is resident while it sleeps.
CHILD_SCRIPT = (
    f"import sys, time\nblock = b'x' * {CHILD_BYTES}\n"
    "print('ready', flush=True)\ntime.sleep(1.5)\n"
)
SAMPLE_INTERVAL = 0.05


def test_kib_fields_converts_to_bytes() -> None:
    lines = ["Name:\tpython", "VmRSS:\t  2048 kB", "VmHWM:\t 4096 kB"]

    fields = _kib_fields(lines, ("VmRSS:", "VmHWM:", "RssAnon:"))

    assert fields == {"VmRSS:": 2048 * KIB, "VmHWM:": 4096 * KIB}


def test_read_process_memory_of_self() -> None:
    memory = read_process_memory(os.getpid())

    assert memory is not None
    assert memory.rss > 0
    assert memory.hwm >= memory.rss
    assert memory.anon > 0


def test_read_process_memory_of_missing_pid() -> None:
    # PIDs on Linux stay below 2**22.
    assert read_process_memory(2**30) is None


def test_read_system_used_is_positive() -> None:
    used = read_system_used()

    assert used is not None
    assert used > 0


def test_sampler_rejects_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        MemorySampler(interval=0)


@pytest.mark.timeout(60)
def test_sampler_sees_child_memory() -> None:
    with MemorySampler(interval=SAMPLE_INTERVAL) as sampler:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(5 * SAMPLE_INTERVAL)
        finally:
            child.kill()
            child.wait()
    peaks = sampler.peaks

    assert peaks.descendants_peak_rss_bytes >= CHILD_BYTES
    assert peaks.descendants_peak_anon_bytes >= CHILD_BYTES
    assert peaks.descendants_max_processes >= 1
    assert peaks.ray_workers_peak_rss_bytes == 0
    assert peaks.samples >= 3


def test_sampler_measures_own_peak() -> None:
    with MemorySampler(interval=SAMPLE_INTERVAL) as sampler:
        block = bytearray(b"x" * CHILD_BYTES)
        del block
    peaks = sampler.peaks

    assert peaks.main_peak_rss_bytes > 0
    # VmHWM keeps the block's pages even though no sample may have seen them.
    assert peaks.main_hwm_bytes is not None
    assert peaks.main_hwm_bytes >= CHILD_BYTES
    assert peaks.system_used_peak_bytes is not None
    assert peaks.system_used_start_bytes is not None
