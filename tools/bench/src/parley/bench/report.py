"""Results: one row per measurement, written as a Markdown table and as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

__all__ = ["Report", "Row", "machine", "format_seconds"]


@dataclass
class Row:
    """One measured result.

    `ratio` compares the row with its baseline as `ratio_basis` says (e.g. calls a second
    against the echo server's); `passed` is None where the row has no target. `broken` marks
    a measurement that failed as a measurement (an exception, nothing counted): the harness,
    not the service, needs fixing.
    """

    name: str
    throughput: float | None = None
    unit: str = ""
    p50: float | None = None  # seconds
    p99: float | None = None  # seconds
    ratio: float | None = None
    ratio_basis: str = ""
    target: str = ""
    passed: bool | None = None
    notes: str = ""
    broken: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 0.001:
        return f"{value * 1000:.2f} ms"
    return f"{value * 1e6:.0f} µs"


def _format_throughput(row: Row) -> str:
    if row.throughput is None:
        return "–"
    value = row.throughput
    number = f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
    return f"{number} {row.unit}".strip()


def _format_ratio(row: Row) -> str:
    if row.ratio is None:
        return "–"
    return f"{row.ratio:.2f}× ({row.ratio_basis})" if row.ratio_basis else f"{row.ratio:.2f}×"


def _verdict(row: Row) -> str:
    if row.broken:
        return "**BROKEN**"
    if row.passed is None:
        return ""
    return "pass" if row.passed else "**FAIL**"


def machine() -> dict[str, Any]:
    """What the run ran on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


@dataclass
class Report:
    """Every row of one run, and how the run was set up."""

    title: str
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0
    # The machine's 1-minute load average when the run started and ended: other work on the
    # machine shows here, and every figure of a loaded machine is noisier.
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    load_after: float | None = None
    only: frozenset[str] | None = None  # the sections to run (None: all)

    def selected(self, section: str) -> bool:
        return self.only is None or section in self.only

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @property
    def broken(self) -> list[Row]:
        return [row for row in self.rows if row.broken]

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if row.passed is False]

    def markdown(self) -> str:
        info = machine()
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        lines = [
            f"# {self.title}",
            "",
            f"{when}, {self.elapsed:.0f} s; {info['cpus']} CPUs ({info['cpu_model']}), "
            f"{info['memory']}, {info['system']}, Python {info['python']}, "
            f"grpcio {info['grpcio']}; client and servers share the CPUs; load average "
            f"{self.load_before:.1f} at the start, {self.load_after or 0:.1f} at the end.",
            "",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in self.settings.items()) + ".",
            "",
            "| benchmark | throughput | p50 | p99 | ratio to baseline | target | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.name} | {_format_throughput(row)} | {format_seconds(row.p50)} "
                f"| {format_seconds(row.p99)} | {_format_ratio(row)} | {row.target} "
                f"| {_verdict(row)} |"
            )
        notes = [(row.name, row.notes) for row in self.rows if row.notes]
        if notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {name}: {note}" for name, note in notes]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "elapsed_seconds": round(self.elapsed, 1),
            "machine": machine(),
            "load_average": {"start": self.load_before, "end": self.load_after},
            "settings": self.settings,
            "rows": [asdict(row) for row in self.rows],
        }

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Writes `<name>.md` and `<name>.json` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        markdown = directory / f"{name}.md"
        data = directory / f"{name}.json"
        markdown.write_text(self.markdown(), encoding="utf-8")
        data.write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")
        return markdown, data
