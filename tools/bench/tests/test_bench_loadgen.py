"""The load generator against the bare echo baseline: it counts what it should and stops."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from parley.bench.baseline import (
    ECHO_STREAM_METHOD,
    ECHO_UNARY_METHOD,
    BaselineServer,
    start_echo_server,
)
from parley.bench.loadgen import FixedRequest, LoadGenerator, Workload, percentile, run_load

STREAM_ITEMS = 7


@pytest.fixture(scope="module")
def echo() -> Iterator[BaselineServer]:
    server = start_echo_server(80, stream_item_size=40, stream_items=STREAM_ITEMS)
    yield server
    server.close()


def test_counts_unary_calls_and_stops_by_its_deadline(echo: BaselineServer) -> None:
    workload = Workload(echo.address, ECHO_UNARY_METHOD, FixedRequest(b"\x08\x01"))
    started = time.monotonic()
    result = run_load(workload, processes=2, concurrency=4, duration=1.0, warm_up=0.2)
    elapsed = time.monotonic() - started

    assert result.calls > 50
    assert result.errors == {}
    assert result.throughput == pytest.approx(result.calls / 1.0)
    assert 0 < result.p50 <= result.p99
    # Little's law: calls in flight = throughput x latency; the median stands in for the
    # mean, and the CPU is shared, hence the wide margin.
    assert 4 / 5 < result.throughput * result.p50 < 4 * 5
    # Spawning, connecting, warm-up and the window, and nothing waiting for a stray call.
    assert elapsed < 30


def test_counts_streamed_items(echo: BaselineServer) -> None:
    workload = Workload(echo.address, ECHO_STREAM_METHOD, FixedRequest(b""), kind="server_stream")
    result = run_load(workload, processes=1, concurrency=2, duration=0.5, warm_up=0.1)
    assert result.calls > 0
    assert result.items == result.calls * STREAM_ITEMS
    assert result.item_throughput == pytest.approx(result.items / 0.5)


def test_counts_errors_by_status_code(echo: BaselineServer) -> None:
    workload = Workload(echo.address, "/bench.Echo/Missing", FixedRequest(b""))
    result = run_load(workload, processes=1, concurrency=2, duration=0.5, warm_up=0.1)
    assert result.calls == 0
    assert set(result.errors) == {"UNIMPLEMENTED"}
    assert result.errors["UNIMPLEMENTED"] > 0


def test_refuses_fewer_calls_in_flight_than_processes(echo: BaselineServer) -> None:
    workload = Workload(echo.address, ECHO_UNARY_METHOD, FixedRequest(b""))
    with pytest.raises(ValueError):
        run_load(workload, processes=2, concurrency=1, duration=1, warm_up=0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) == 0.0


def test_reuses_its_worker_processes_across_load_tests(echo: BaselineServer) -> None:
    workload = Workload(echo.address, ECHO_UNARY_METHOD, FixedRequest(b""))
    with LoadGenerator() as generator:
        first = generator.run(workload, processes=2, concurrency=2, duration=1.0, warm_up=0.2)
        pids = [process.pid for process in generator._workers]
        second = generator.run(workload, processes=1, concurrency=3, duration=1.0, warm_up=0.2)
        assert [process.pid for process in generator._workers] == pids
    assert first.calls > 0 and second.calls > 0
    assert (first.processes, second.processes, second.concurrency) == (2, 1, 3)
