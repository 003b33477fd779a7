"""Reading back the log files the stack's servers write."""

from __future__ import annotations

from pathlib import Path

__all__ = ["tail"]


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, indented, with a header naming the file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"  (no log at {path})"
    last = text.splitlines()[-lines:]
    body = "\n".join(f"  {line}" for line in last) if last else "  (empty)"
    return f"last lines of {path}:\n{body}"
