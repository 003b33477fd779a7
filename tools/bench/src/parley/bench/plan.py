"""How big and how long a run is: the full run's sizes and the smoke run's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from parley.bench.loadgen import LoadGenerator, LoadResult, Workload
from parley.bench.report import Row

__all__ = ["FULL", "SMOKE", "Plan", "close_workers", "load_row"]

# The load generator's worker processes, shared by every load test of a run.
_GENERATOR = LoadGenerator()


def close_workers() -> None:
    """Stops the shared load generator's worker processes."""
    _GENERATOR.close()


@dataclass(frozen=True)
class Plan:
    duration: float = 8.0  # measured seconds of each load test
    warm_up: float = 2.0
    processes: int = 2  # load generator processes
    concurrency: int = 32  # calls in flight in total
    users: int = 100_000  # rows in the ListUsers table
    page_size: int = 50  # the paging rows' page size
    deep_pages: int = 1000  # how deep the deep page is
    paging_concurrency: int = 1  # calls in flight when timing pages
    big_page: int = 1000  # the streaming-throughput row's page size
    chat_streams: int = 100  # listening streams, spread over both replicas
    chat_senders: int = 2
    chat_window: int = 8  # messages each sender has in flight at saturation
    chat_load: float = 0.5  # fraction of the saturated rate for the latency phase
    idle_streams: int = 10_000  # on one replica, for the memory and fan-out rows
    hot_senders: int = 16  # writers, each its own user, for the hot-room row
    foreign_messages: int = 4000  # each way, for the rooms-not-served row
    startup_runs: int = 3
    retention_backlog: int = 400_000  # old messages the retention row's sweep deletes

    def load(self, workload: Workload, *, concurrency: int | None = None) -> LoadResult:
        in_flight = self.concurrency if concurrency is None else concurrency
        return _GENERATOR.run(
            workload,
            processes=min(self.processes, in_flight),
            concurrency=in_flight,
            duration=self.duration,
            warm_up=self.warm_up,
        )

    def with_overrides(self, **changes: Any) -> Plan:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan()
SMOKE = Plan(
    duration=1.0,
    warm_up=0.5,
    processes=1,  # each spawned worker costs about a second of start-up
    concurrency=8,
    users=5_000,
    deep_pages=50,
    big_page=200,
    chat_streams=10,
    chat_senders=1,
    idle_streams=200,
    hot_senders=4,
    foreign_messages=400,
    startup_runs=1,
    retention_backlog=20_000,
)


def load_row(name: str, result: LoadResult, *, items: str | None = None) -> Row:
    """A row from a load test: calls (or streamed `items`) a second, p50, p99, errors."""
    throughput = result.item_throughput if items else result.throughput
    row = Row(
        name=name,
        throughput=throughput,
        unit=f"{items}/s" if items else "calls/s",
        p50=result.p50,
        p99=result.p99,
        details={
            "calls": result.calls,
            "items": result.items,
            "errors": result.errors,
            "straddled": result.straddled,
            "duration": result.duration,
            "processes": result.processes,
            "concurrency": result.concurrency,
        },
    )
    if result.calls == 0:
        row.broken = True
        row.notes = (
            f"no call succeeded inside the window ({result.straddled} calls straddled "
            "the warm-up's end or the window's end)"
        )
    if result.errors:
        failed = ", ".join(f"{count} {code}" for code, count in sorted(result.errors.items()))
        row.notes = (row.notes + "; " if row.notes else "") + f"errors: {failed}"
        if result.error_count > result.calls:
            row.broken = True
    return row
