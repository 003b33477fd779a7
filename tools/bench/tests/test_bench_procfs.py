"""What /proc says about this process and the machine."""

from __future__ import annotations

import os
import time

from parley.bench.procfs import cpu_seconds, machine_busy_seconds, rss_bytes


def test_reads_this_processs_memory_and_cpu_time() -> None:
    assert rss_bytes(os.getpid()) > 1_000_000
    before = cpu_seconds(os.getpid())
    until = time.process_time() + 0.05
    while time.process_time() < until:
        pass
    assert cpu_seconds(os.getpid()) > before


def test_reads_the_machines_busy_time() -> None:
    busy, cpus = machine_busy_seconds()
    assert cpus == os.cpu_count()
    assert 0 < busy <= machine_busy_seconds()[0]
