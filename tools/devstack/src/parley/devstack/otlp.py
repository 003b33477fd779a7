"""A real OTLP trace receiver inside the calling process: OpenTelemetry's collector service
(`opentelemetry.proto.collector.trace.v1.TraceService`) over gRPC on a loopback port.

Services started with `OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint` export their spans to
it exactly as they would to Jaeger or an OpenTelemetry Collector. A test waits for the spans
it expects and looks at their ids, parents and links; the benchmarks use it as the place
traced services send their spans to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpReceiver", "ReceivedSpan"]

SPAN_KIND = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids in lower-case hex."""

    service: str  # the resource's service.name
    name: str
    kind: str  # server, client, internal, producer or consumer
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id) of each link
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any] = field(default_factory=dict)  # the exporting process's

    @classmethod
    def decode(cls, resource: dict[str, Any], span: trace_pb2.Span) -> ReceivedSpan:
        return cls(
            service=str(resource.get("service.name", "")),
            resource=resource,
            name=span.name,
            kind=SPAN_KIND.get(span.kind, "unspecified"),
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            attributes=_attributes(span.attributes),
            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
            status_code=span.status.code,
        )


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                spans.extend(ReceivedSpan.decode(resource, span) for span in scope_spans.spans)
        self._receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects every span exported to `endpoint` until `stop()`; thread-safe."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"
        self._server.start()

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def env(self, **overrides: str) -> dict[str, str]:
        """The OTEL_* settings that send a service's spans here, every span sampled and
        exported within 100 ms."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            **overrides,
        }

    def wait_for(self, found: Callable[[list[ReceivedSpan]], Any], timeout: float = 20.0) -> Any:
        """Waits until `found(spans)` returns something truthy and returns it; raises
        AssertionError, listing what arrived, after `timeout` seconds."""
        with self._changed:
            result = found(list(self._spans))
            if not result:
                self._changed.wait_for(lambda: found(list(self._spans)), timeout)
                result = found(list(self._spans))
            if not result:
                arrived = "\n".join(
                    f"  {s.service} {s.kind} {s.name} trace={s.trace_id} span={s.span_id} "
                    f"parent={s.parent_span_id or '-'}"
                    for s in self._spans
                )
                raise AssertionError(
                    f"the spans looked for did not arrive within {timeout:g}s; "
                    f"{len(self._spans)} arrived:\n{arrived}"
                )
            return result

    async def arrival(
        self, found: Callable[[list[ReceivedSpan]], Any], timeout: float = 20.0
    ) -> Any:
        """`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, found, timeout)

    def stop(self) -> None:
        self._server.stop(grace=None)
