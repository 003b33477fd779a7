"""Distributed tracing with OpenTelemetry: off unless the standard `OTEL_*` variables say so.

Tracing is process-wide, as OpenTelemetry's instrumentations are: `start_tracing` runs once,
before the service builds its pools, and sets the global tracer provider. While it has not
run, `active()` is False and nothing else here is on any call's path: no interceptor, no
exemplar, no log field, no trace context on the chat bus.

What is turned on (`TracingSettings.from_env` reads, and checks, every variable):

- `OTEL_TRACES_EXPORTER`: `otlp` turns tracing on, `none` (or `OTEL_SDK_DISABLED=true`)
  keeps it off. When unset, tracing is on exactly when an OTLP endpoint is set.
- `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: where spans go, an
  `http://` or `https://` URL; `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`):
  `grpc` (the default, port 4317) or `http/protobuf` (port 4318). The exporters read their
  other variables themselves (headers, certificates, timeout, compression).
- `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`: the standard samplers; the default is
  `parentbased_always_on`. A caller's `traceparent` decides for parent-based samplers, so a
  service exposed to untrusted callers should use `traceidratio`: a call that continues a
  caller's trace is then sampled by a draw of this process (see `_otel_sdk._RequestsOnly`).
- Only W3C trace context (`traceparent`, `tracestate`) is read from calls and passed on;
  baggage is not (`OTEL_PROPAGATORS` is not read).
- `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`: the service's name (default
  `parley-user` or `parley-chat`) and further resource attributes.
- `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: the
  batch span processor's queue (2,048 spans), how often it exports (5,000 ms) and its batch
  size (512); spans beyond a full queue are dropped, never waited for.

Only spans of a request are kept: a root span that is not a server, producer or consumer span
(a health check's query, a background sweep's, a readiness PING) is never sampled, so probes
and timers do not flood the trace store.

Server spans are written here, by the chassis' observability interceptor, not by
OpenTelemetry's grpc.aio server interceptor: that one attaches and detaches the span's context
inside a streaming handler's generator, which grpc.aio closes from another context when a
client leaves a stream, and each such stream then logged two ERROR lines ("Failed to detach
context"). A call's span is made current for its task only, and ended with its status.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from parley.chassis.config import ConfigError, Env

__all__ = [
    "SAMPLERS",
    "TracingSettings",
    "active",
    "client_interceptors",
    "current_ids",
    "end_server_span",
    "start_server_span",
    "exemplar",
    "linked_context",
    "traceparent",
    "register_metrics",
    "start_tracing",
    "stop_tracing",
    "tracer",
]


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True)
class TracingSettings:
    """What the `OTEL_*` variables ask for; `enabled` False means no tracing at all."""

    enabled: bool
    protocol: str = "grpc"
    endpoint: str | None = None
    # Whether `endpoint` came from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (a full URL for HTTP)
    # rather than OTEL_EXPORTER_OTLP_ENDPOINT (a base URL, to which HTTP adds /v1/traces).
    traces_endpoint: bool = False
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    # The batch span processor: spans waiting at most, how often a batch goes (ms), its size.
    queue: int = 2048
    delay_ms: int = 5000
    batch: int = 512

    @classmethod
    def from_env(cls, env: Env) -> TracingSettings:
        disabled = env.choice("OTEL_SDK_DISABLED", "false", ("true", "false"), ignore_case=True)
        exporter = env.raw("OTEL_TRACES_EXPORTER")
        if exporter is not None and exporter.lower() not in ("otlp", "none"):
            raise ConfigError(
                "OTEL_TRACES_EXPORTER",
                f"must be otlp or none (Parley exports OTLP), got {exporter!r}",
            )
        endpoint_name = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            if env.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is not None
            else "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        endpoint = env.raw(endpoint_name)
        if endpoint is not None and not _is_endpoint(endpoint):
            raise ConfigError(
                endpoint_name, f"must be an http:// or https:// URL, got {endpoint!r}"
            )
        if endpoint is not None and "@" in urlsplit(endpoint).netloc:
            raise ConfigError(
                endpoint_name,
                "must not hold a user or password (they would be logged, and gRPC cannot use "
                "them); give credentials in OTEL_EXPORTER_OTLP_HEADERS",
            )
        protocol_name = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if env.raw("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") is not None
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = env.choice(protocol_name, "grpc", PROTOCOLS)
        sampler = env.choice("OTEL_TRACES_SAMPLER", "parentbased_always_on", SAMPLERS)
        ratio = env.ratio("OTEL_TRACES_SAMPLER_ARG", 1.0) if sampler.endswith("ratio") else 1.0
        queue = env.integer("OTEL_BSP_MAX_QUEUE_SIZE", 2048, minimum=1, maximum=100_000)
        delay_ms = env.integer("OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=10, maximum=60_000)
        batch = env.integer(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, queue), minimum=1, maximum=queue
        )
        if disabled == "true" or (exporter or "").lower() == "none":
            enabled = False
        else:
            enabled = exporter is not None or endpoint is not None
        traces_endpoint = endpoint_name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        return cls(
            enabled, protocol, endpoint, traces_endpoint, sampler, ratio, queue, delay_ms, batch
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.enabled:
            return "tracing off"
        sampler = self.sampler + (f" {self.ratio:g}" if self.sampler.endswith("ratio") else "")
        endpoint = self.endpoint or "the default endpoint"
        return f"tracing on: OTLP {self.protocol} to {endpoint}, sampler {sampler}"

    def http_traces_url(self) -> str | None:
        """The URL the HTTP exporter posts to (None: its default, localhost:4318)."""
        if self.endpoint is None or self.traces_endpoint:
            return self.endpoint
        return self.endpoint.rstrip("/") + "/v1/traces"


def _is_endpoint(url: str) -> bool:
    """An http(s) URL with a host and, if any, a port from 1 to 65535, and no white space."""
    if re.search(r"\s", url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


_provider: Any = None  # the SDK's TracerProvider, once start_tracing has run
_counts: Counter | None = None
_server_tracer: trace.Tracer | None = None


def active() -> bool:
    """Whether `start_tracing` has turned tracing on in this process."""
    return _provider is not None


def tracer(name: str) -> trace.Tracer:
    """A tracer for spans written by hand (where no instrumentation covers the work)."""
    return trace.get_tracer(name)


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id in hex, or None when there is no span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def exemplar() -> dict[str, str] | None:
    """The exemplar for a histogram observation: the current trace id when it is sampled."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


def client_interceptors() -> list[Any]:
    """Interceptors for a service's grpc.aio channel to another service: a client span per
    call, its W3C trace context in the metadata; none when tracing is off, and none on
    health checks (a replica's readiness probe of its dependency)."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    probes = filters.negate(filters.health_check())
    interceptors: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=probes
    )
    return interceptors


# W3C trace context only: a caller's baggage is not carried into messages between replicas.
_W3C = TraceContextTextMapPropagator()


def traceparent() -> str:
    """The current span's W3C `traceparent`, to carry inside a message; "" when there is no
    span. Its `tracestate` (a caller's, up to 8 KiB) is not carried."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def linked_context(traceparent: str) -> trace.SpanContext | None:
    """The span context a message carried (see `traceparent`), to link a span to; None when
    it is malformed."""
    context = trace.get_current_span(_W3C.extract({"traceparent": traceparent}))
    span_context = context.get_span_context()
    return span_context if span_context.is_valid else None


def register_metrics(registry: CollectorRegistry) -> None:
    """`parley_trace_spans_total{result}` in `registry` (the server's)."""
    global _counts
    _counts = Counter(
        "parley_trace_spans_total",
        "Sampled spans by what became of them: ended (handed to the export queue), ok and "
        "failed (exported or not by the OTLP exporter); ended minus ok and failed is what a "
        "full queue (OTEL_BSP_MAX_QUEUE_SIZE) dropped, or still waits.",
        ["result"],
        registry=registry,
    )
    for result in ("ended", "ok", "failed"):
        _counts.labels(result)


def _count(result: str, spans: int) -> None:
    if _counts is not None:
        _counts.labels(result).inc(spans)


def start_tracing(settings: TracingSettings, service_name: str, version: str = "0.1.0") -> bool:
    """Turns tracing on as `settings` say, process-wide; returns whether it is on.

    Instruments psycopg and, for a service that imports redis, redis-py; GrpcApp adds server
    spans when `active()`. Call it once, before any pool is made. A value OpenTelemetry's SDK
    refuses (one of the variables it reads itself) is a one-line ConfigError."""
    global _provider, _server_tracer
    if not settings.enabled or _provider is not None:
        return _provider is not None
    try:
        # The SDK reads some variables as it is imported (the span limits), others as the
        # exporter is built (timeout, compression): whatever it refuses, one line.
        from parley.chassis._otel_sdk import build_provider

        provider = build_provider(settings, service_name, version, _count)
    except Exception as exc:
        raise ConfigError("OTEL_*", f"OpenTelemetry refused a setting: {exc}") from None
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    trace.set_tracer_provider(provider)
    # W3C trace context only, in and out: a caller's baggage (up to 8 KiB of it) is neither
    # believed nor forwarded to UserService with chat's calls (OTEL_PROPAGATORS is not read).
    propagate.set_global_textmap(_W3C)
    # A malformed `tracestate` from a caller would be a WARNING per call, with its text.
    logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)
    # Warnings that would repeat per span, per statement or per retry, and that
    # parley_trace_spans_total counts instead: "Queue full, dropping Span", an attribute cut
    # to MAX_ATTRIBUTE_LENGTH (a long statement's text), an export retried. A batch that
    # failed is still one ERROR line.
    for name in (
        "opentelemetry.sdk._shared_internal",
        "opentelemetry.attributes",
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    _provider = provider
    _server_tracer = provider.get_tracer("parley.chassis")
    # No SQL comments: they would make every statement text unique to Postgres' statistics.
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:  # a service without Redis does not install its instrumentation
        pass
    else:
        RedisInstrumentor().instrument(tracer_provider=provider)
    return True


def stop_tracing(timeout: float = 2.0) -> None:
    """Exports the spans still queued, for at most `timeout` seconds, and stops tracing.

    The SDK's flush and shutdown wait for the exporter's retries (up to its timeout per
    batch, and 30 s more), so they run on a thread of their own that the process does not
    wait for: a collector that is down never holds a stopping service past its grace."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return

    def flush() -> None:
        provider.force_flush(int(timeout * 1000))
        provider.shutdown()

    flushing = threading.Thread(target=flush, name="trace-flush", daemon=True)
    flushing.start()
    flushing.join(timeout)


# The status codes that make a server span an error (the server failed, not the caller).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def start_server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> trace.Span:
    """The server span of one call to `method` (`/package.Service/Method`), continuing the
    caller's W3C trace context from `metadata`, and made current for the rest of the call's
    task (grpc.aio runs each call in a task of its own, so it is never detached)."""
    assert _server_tracer is not None
    carrier = {
        key: value for key, value in metadata or () if key in _W3C_KEYS and isinstance(value, str)
    }
    parent = _W3C.extract(carrier) if carrier else otel_context.Context()
    service, _, name = method.lstrip("/").partition("/")
    span = _server_tracer.start_span(
        method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    otel_context.attach(trace.set_span_in_context(span))
    return span


def end_server_span(span: trace.Span, code: Any, message: str) -> None:
    """Ends a server span with the call's status (`code`, a grpc.StatusCode)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in _SERVER_ERRORS:
        span.set_status(trace.StatusCode.ERROR, message or code.name)
    span.end()


_W3C_KEYS = frozenset({"traceparent", "tracestate"})
