"""What /proc says about a process (its memory, its CPU time) and about the whole machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "machine_busy_seconds", "rss_bytes"]

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from VmRSS in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def machine_busy_seconds() -> tuple[float, int]:
    """CPU seconds the machine's CPUs spent busy so far (neither idle nor waiting for I/O),
    summed over all of them, from /proc/stat; and how many CPUs it counts."""
    lines = Path("/proc/stat").read_text().splitlines()
    fields = [int(value) for value in lines[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # idle, iowait
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return busy / _TICKS, cpus
