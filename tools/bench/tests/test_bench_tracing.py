"""The tracing section: its rows (off A, the noise band, on's cost), its checks that on traced
and off did not, and the OTLP receiver in a process of its own."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from parley.bench.chat import FanOutResult
from parley.bench.loadgen import LoadResult
from parley.bench.plan import FULL
from parley.bench.scrape import metric_total
from parley.bench.tracing import (
    OFF_A,
    OFF_B,
    ON,
    ChatRun,
    Observed,
    UnaryRun,
    _check,
    _Receiver,
    chat_rows,
    unary_rows,
)


def _load(calls: int, p50: float, p99: float) -> LoadResult:
    return LoadResult(
        calls=calls, items=0, errors={}, duration=4.0, p50=p50, p99=p99, processes=2,
        concurrency=32,
    )  # fmt: skip


def _fan_out(messages: float, p50: float, p99: float) -> FanOutResult:
    return FanOutResult(
        streams=100, senders=2, saturated_messages=messages,
        saturated_deliveries=messages * 100, saturated_p50=0.1, saturated_p99=0.3,
        load_rate=60.0, load_deliveries=6000.0, p50=p50, p99=p99, same_p50=p50,
        same_p99=p99, other_p50=p50, other_p99=p99, missing=0, stream_errors={},
    )  # fmt: skip


def test_get_user_rows_state_the_band_and_the_cost() -> None:
    spans = {"server": 6000, "client": 6000}
    runs = {
        OFF_A: UnaryRun(OFF_A, _load(6000, 0.020, 0.040), Observed(5.0, 4.0, (6000.0,))),
        ON: UnaryRun(ON, _load(4000, 0.030, 0.080), Observed(5.0, 4.2, (6000.0,), spans,
                                                             ("parley-user",), 0.5, True)),
        OFF_B: UnaryRun(OFF_B, _load(6300, 0.019, 0.044), Observed(5.0, 4.1, (6300.0,))),
    }  # fmt: skip

    first, second, third = unary_rows(runs, FULL.with_overrides(duration=4.0, warm_up=1.0))

    assert first.name == "GetUser, tracing off (A)"
    assert (first.ratio, first.ratio_basis) == (1.0, "itself")
    assert first.throughput == pytest.approx(1500.0)
    assert "server CPU 667 µs per call" in first.notes
    assert second.name == "GetUser, tracing off again (B): the noise band"
    assert second.ratio == pytest.approx(1.05)  # calls/s, B against A
    assert second.target == "off within noise"
    assert "calls/s 1.05×, p50 0.95×, p99 1.10×" in second.notes
    assert "off is within noise" in second.notes
    # On against the geometric mean of A and B: calls/s 1,000 / sqrt(1,500 x 1,575).
    assert third.ratio == pytest.approx(1000 / (1500 * 1575) ** 0.5)
    assert third.ratio_basis == "calls/s vs off A and B"
    assert "calls/s 0.65× (beyond the noise band, ±5.0%)" in third.notes
    assert "server CPU per call 1.06× (beyond the noise band, ±2.4%)" in third.notes
    assert "2.00 (1.00 client, 1.00 server) a call" in third.notes
    assert "a server span for 100% of the calls" in third.notes
    assert "2,000 spans/s reached the receiver" in third.notes
    assert "used 0.10 of a core" in third.notes
    assert not any(row.broken for row in (first, second, third))


def test_chat_rows_compare_delivery_p99_and_sender_throughput() -> None:
    spans = {"server": 20, "client": 300, "producer": 100}
    runs = {
        OFF_A: ChatRun(OFF_A, _fan_out(100.0, 0.010, 0.030), Observed(15.0, 3.0, (100.0, 30000.0))),
        ON: ChatRun(ON, _fan_out(90.0, 0.012, 0.060), Observed(15.0, 3.3, (100.0, 30000.0),
                                                               spans, ("parley-chat",), 0.3, True)),
        OFF_B: ChatRun(OFF_B, _fan_out(110.0, 0.011, 0.031), Observed(15.0, 3.0, (100.0, 30000.0))),
    }  # fmt: skip

    rows = chat_rows(runs, FULL)

    assert [row.name for row in rows] == [
        "chat fan-out, 100 streams on 2 replicas, tracing off (A)",
        "chat fan-out, 100 streams on 2 replicas, tracing off again (B): the noise band",
        "chat fan-out, 100 streams on 2 replicas, tracing on (every span sampled, "
        "exported over OTLP)",
    ]
    first, second, third = rows
    assert (first.throughput, first.unit, first.p99) == (100.0, "messages/s", 0.030)
    assert second.ratio == pytest.approx(0.031 / 0.030)
    assert second.ratio_basis == "delivery p99 vs off A"
    assert third.ratio == pytest.approx(0.060 / (0.030 * 0.031) ** 0.5)
    assert "sender messages/s 0.86× (beyond the noise band, ±10.0%)" in third.notes
    assert "replicas' CPU 100 µs → 110 µs a delivery, 30.00 ms → 33.00 ms a message" in third.notes
    assert "4.20 (3.00 client, 1.00 producer, 0.20 server) per message stored" in third.notes
    assert "28 spans/s reached the receiver over the run" in third.notes


def test_checks_that_on_traced_and_off_did_not() -> None:
    traced = Observed(1.0, 1.0, (1.0,), {"server": 3}, ("parley-user",), 0.1, True)
    quiet = Observed(1.0, 1.0, (1.0,))
    _check(ON, traced, "GetUser")
    _check(OFF_A, quiet, "GetUser")
    with pytest.raises(RuntimeError, match="no server span reached the receiver"):
        _check(ON, quiet, "GetUser")
    with pytest.raises(RuntimeError, match="3 spans reached the receiver during its run"):
        _check(OFF_B, traced, "GetUser")
    with pytest.raises(RuntimeError, match="started a span exporter"):
        _check(OFF_A, Observed(1.0, 1.0, (1.0,), exporting=True), "GetUser")


def test_receiver_process_counts_spans_by_service_and_kind() -> None:
    receiver = _Receiver()
    try:
        assert receiver.env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://127.0.0.1:")
        spans = [
            trace_pb2.Span(name="a", kind=trace_pb2.Span.SPAN_KIND_SERVER),
            trace_pb2.Span(name="b", kind=trace_pb2.Span.SPAN_KIND_CLIENT),
            trace_pb2.Span(name="c", kind=trace_pb2.Span.SPAN_KIND_CLIENT),
        ]
        name = KeyValue(key="service.name", value=AnyValue(string_value="parley-user"))
        request = trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=Resource(attributes=[name]),
                    scope_spans=[trace_pb2.ScopeSpans(spans=spans)],
                )
            ]
        )
        address = receiver.env["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://")
        with grpc.insecure_channel(address) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.Export(request, timeout=10)

        assert receiver.settled() == {("parley-user", "server"): 1, ("parley-user", "client"): 2}
        assert receiver.cpu() > 0
    finally:
        receiver.stop()


def test_sums_a_metric_over_its_labels() -> None:
    samples = {
        'grpc_server_handled_total{grpc_method="GetUser",grpc_code="OK"}': 5.0,
        'grpc_server_handled_total{grpc_method="GetUser",grpc_code="NOT_FOUND"}': 2.0,
        'grpc_server_handled_total{grpc_method="ListUsers",grpc_code="OK"}': 7.0,
        'grpc_server_handled_created{grpc_method="GetUser",grpc_code="OK"}': 1e9,
        "parley_chat_messages_received_total": 3.0,
    }
    assert metric_total(samples, "grpc_server_handled_total", grpc_method="GetUser") == 7.0
    assert metric_total(samples, "grpc_server_handled_total") == 14.0
    assert metric_total(samples, "parley_chat_messages_received_total") == 3.0
