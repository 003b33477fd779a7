"""What a test reads of a running process."""

from __future__ import annotations

from pathlib import Path

__all__ = ["rss_bytes"]


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")
