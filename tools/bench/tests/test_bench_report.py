"""The report writer: a Markdown table and JSON, with pass, FAIL and BROKEN rows."""

from __future__ import annotations

import json
from pathlib import Path

from parley.bench.report import Report, Row, format_seconds


def test_writes_markdown_and_json(tmp_path: Path) -> None:
    report = Report("Parley benchmarks", settings={"load": "2 processes"})
    report.add(Row(name="baseline", throughput=12_345.6, unit="calls/s", p50=0.0012, p99=0.0031,
                   ratio=1.0, ratio_basis="itself"))  # fmt: skip
    report.add(Row(name="GetUser", throughput=7000.0, unit="calls/s", p50=0.002, p99=0.005,
                   ratio=0.567, ratio_basis="calls/s vs echo", target="≥ 0.60×",
                   passed=False, notes="p99 1.6× echo's"))  # fmt: skip
    report.add(Row(name="start", p50=0.8, p99=1.2, target="< 2 s", passed=True))
    report.add(Row(name="broken section", broken=True, notes="RuntimeError('x')"))
    report.elapsed = 12.0

    markdown_path, json_path = report.write(tmp_path / "results", "latest")

    markdown = markdown_path.read_text()
    assert markdown.startswith("# Parley benchmarks\n")
    assert (
        "| benchmark | throughput | p50 | p99 | ratio to baseline | target | result |" in markdown
    )
    assert "| baseline | 12,346 calls/s | 1.20 ms | 3.10 ms | 1.00× (itself) |  |  |" in markdown
    assert "| GetUser | 7,000 calls/s | 2.00 ms | 5.00 ms | 0.57× (calls/s vs echo) " in markdown
    assert "| ≥ 0.60× | **FAIL** |" in markdown
    assert "| start | – | 800.00 ms | 1.20 s | – | < 2 s | pass |" in markdown
    assert "| broken section | – | – | – | – |  | **BROKEN** |" in markdown
    assert "- GetUser: p99 1.6× echo's" in markdown

    data = json.loads(json_path.read_text())
    assert [row["name"] for row in data["rows"]] == [
        "baseline",
        "GetUser",
        "start",
        "broken section",
    ]
    assert data["rows"][1]["passed"] is False
    assert data["machine"]["cpus"] >= 1
    assert data["elapsed_seconds"] == 12.0
    assert [row.name for row in report.broken] == ["broken section"]
    assert [row.name for row in report.failed] == ["GetUser"]


def test_formats_seconds() -> None:
    assert format_seconds(None) == "–"
    assert format_seconds(2.5) == "2.50 s"
    assert format_seconds(0.0125) == "12.50 ms"
    assert format_seconds(0.000250) == "250 µs"


def test_selects_sections() -> None:
    report = Report("Parley benchmarks", settings={})
    assert report.selected("hot room")
    report.only = frozenset({"hot room"})
    assert report.selected("hot room")
    assert not report.selected("unary")
