"""Prometheus metrics with the names, labels and code spelling of go-grpc-middleware.

Grafana dashboards built for Go gRPC services work unchanged on Parley's metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "GO_CODE_NAMES",
    "GrpcServerMetrics",
    "MethodMetrics",
    "grpc_type",
    "start_metrics_server",
]

# The `_created` series of every counter would double the series count for no dashboard's use.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# grpc_code label values, spelled as Go's codes.Code.String() spells them.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# prometheus.DefBuckets of the Go client, which go-grpc-middleware uses.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The grpc_type label: unary, client_stream, server_stream or bidi_stream."""
    if client_streaming and server_streaming:
        return "bidi_stream"
    if client_streaming:
        return "client_stream"
    if server_streaming:
        return "server_stream"
    return "unary"


class MethodMetrics:
    """The grpc_server_* series of one method, bound once so a call does no label lookups."""

    __slots__ = ("handled", "handling_seconds", "labels", "msg_received", "msg_sent", "started")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = metrics.started.labels(*labels)
        self.msg_received = metrics.msg_received.labels(*labels)
        self.msg_sent = metrics.msg_sent.labels(*labels)
        self.handling_seconds = metrics.handling_seconds.labels(*labels)
        self.handled = {
            code: metrics.handled.labels(*labels, name) for code, name in GO_CODE_NAMES.items()
        }


class GrpcServerMetrics:
    """The grpc_server_* metrics of one server, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            labels,
            registry=self.registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=GO_DEFAULT_BUCKETS,
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "parley_dependency_up",
            "1 when the last health check of a dependency passed, else 0.",
            ["dependency"],
            registry=self.registry,
        )
        self.dependency_check_seconds = Histogram(
            "parley_dependency_check_seconds",
            "Time taken by dependency health checks.",
            ["dependency"],
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "parley_limit_refusals_total",
            "Calls or messages refused with RESOURCE_EXHAUSTED by a configured limit.",
            ["limit"],
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "parley_streams_open",
            "Streaming calls open on this replica, health Watch streams aside "
            "(limited by PARLEY_MAX_STREAMS).",
            registry=self.registry,
        )
        self.open_unary_calls = Gauge(
            "parley_unary_calls_open",
            "Unary calls open on this replica, health checks aside, counted until their answer "
            "is written (limited by PARLEY_MAX_UNARY_CALLS).",
            registry=self.registry,
        )
        self._methods: dict[tuple[str, str, str], MethodMetrics] = {}

    def method(self, grpc_type: str, service: str, method: str) -> MethodMetrics:
        """The series of one method, with every grpc_code series created."""
        labels = (grpc_type, service, method)
        found = self._methods.get(labels)
        if found is None:
            found = self._methods[labels] = MethodMetrics(self, labels)
        return found

    def initialize_limits(self, limits: Iterable[str]) -> None:
        """Pre-create the refusal series of each limit, so a dashboard sees 0, not nothing."""
        for limit in limits:
            self.limit_refusals.labels(limit)

    def initialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Pre-create every method x code series so rates are right from the first scrape."""
        for service in services:
            for method in service.methods:
                self.method(
                    grpc_type(method.client_streaming, method.server_streaming),
                    service.full_name,
                    method.name,
                )


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, Thread, int]:
    """Serve /metrics on a background thread; returns the server, its thread and the bound port."""
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    bound: Any = server.server_address[1]
    return server, thread, int(bound)
