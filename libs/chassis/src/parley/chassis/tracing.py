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
  service exposed to untrusted callers should use `traceidratio`, which ignores it.
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
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    Resource,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from parley.chassis.config import ConfigError, Env

__all__ = [
    "SAMPLERS",
    "TracingSettings",
    "active",
    "client_interceptors",
    "current_ids",
    "exemplar",
    "linked_context",
    "trace_context",
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
        protocol_name = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if env.raw("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") is not None
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = env.choice(protocol_name, "grpc", PROTOCOLS)
        sampler = env.choice("OTEL_TRACES_SAMPLER", "parentbased_always_on", SAMPLERS)
        ratio = env.ratio("OTEL_TRACES_SAMPLER_ARG", 1.0) if sampler.endswith("ratio") else 1.0
        queue = env.integer("OTEL_BSP_MAX_QUEUE_SIZE", 2048, minimum=1, maximum=1_000_000)
        delay_ms = env.integer("OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=1, maximum=3_600_000)
        batch = env.integer(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, queue), minimum=1, maximum=queue
        )
        if disabled == "true" or (exporter or "").lower() == "none":
            enabled = False
        else:
            enabled = exporter is not None or endpoint is not None
        return cls(enabled, protocol, endpoint, sampler, ratio, queue, delay_ms, batch)

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.enabled:
            return "tracing off"
        sampler = self.sampler + (f" {self.ratio:g}" if self.sampler.endswith("ratio") else "")
        endpoint = self.endpoint or "the default endpoint"
        return f"tracing on: OTLP {self.protocol} to {endpoint}, sampler {sampler}"


def _is_endpoint(url: str) -> bool:
    """An http(s) URL with a host and, if any, a port from 1 to 65535."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


_provider: TracerProvider | None = None
_exported: Counter | None = None


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


def trace_context() -> dict[str, str]:
    """The current span's W3C trace context (`traceparent`, `tracestate`), to carry inside a
    message; empty when there is no span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier


def linked_context(carrier: dict[str, str]) -> trace.SpanContext | None:
    """The span context a message carried (see `trace_context`), to link a span to; None
    when it carried none or a malformed one."""
    context = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return context if context.is_valid else None


def register_metrics(registry: CollectorRegistry) -> None:
    """`parley_trace_spans_exported_total{result}` in `registry` (the server's)."""
    global _exported
    _exported = Counter(
        "parley_trace_spans_exported_total",
        "Spans handed to the OTLP exporter, by result (ok, failed); spans dropped from a full "
        "queue (OTEL_BSP_MAX_QUEUE_SIZE) never get here.",
        ["result"],
        registry=registry,
    )
    _exported.labels("ok")
    _exported.labels("failed")


def start_tracing(settings: TracingSettings, service_name: str, version: str = "0.1.0") -> bool:
    """Turns tracing on as `settings` say, process-wide; returns whether it is on.

    Instruments gRPC servers (through GrpcApp, which asks `active()`), psycopg and, for a
    service that imports redis, redis-py. Call it once, before any pool is made."""
    global _provider
    if not settings.enabled or _provider is not None:
        return _provider is not None
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    # The instance is the host (a pod's name) and the process: replicas tell apart in a trace.
    instance = f"{socket.gethostname()}:{os.getpid()}"
    resource = Resource.create({SERVICE_VERSION: version, SERVICE_INSTANCE_ID: instance})
    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins over the default.
    named = str(resource.attributes.get(SERVICE_NAME, ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource, sampler=_RequestsOnly(_sampler(settings)))
    processor = BatchSpanProcessor(
        _CountingExporter(_exporter(settings)),
        max_queue_size=settings.queue,
        schedule_delay_millis=settings.delay_ms,
        max_export_batch_size=settings.batch,
    )
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    # W3C trace context only, in and out: a caller's baggage (up to 8 KiB of it) is neither
    # believed nor forwarded to UserService with chat's calls (OTEL_PROPAGATORS is not read).
    propagate.set_global_textmap(_W3C)
    _provider = provider
    # No SQL comments: they would make every statement text unique to Postgres' statistics.
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:  # a service without Redis does not install its instrumentation
        pass
    else:
        RedisInstrumentor().instrument(tracer_provider=provider)
    return True


def stop_tracing(timeout: float = 5.0) -> None:
    """Exports the spans still queued (for up to `timeout` seconds) and stops tracing."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    provider.force_flush(int(timeout * 1000))
    provider.shutdown()


def _sampler(settings: TracingSettings) -> sampling.Sampler:
    """The standard sampler `settings.sampler` names (the SDK's own names and classes)."""
    name, ratio = settings.sampler, settings.ratio
    root: sampling.Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


class _RequestsOnly(sampling.Sampler):
    """`inner`, except that a root span other than a server, producer (a chat message sent)
    or consumer (its delivery) span is dropped."""

    def __init__(self, inner: sampling.Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: Any = None,
    ) -> sampling.SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and kind not in _ROOT_KINDS:
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RequestsOnly{{{self._inner.get_description()}}}"


_ROOT_KINDS = (trace.SpanKind.SERVER, trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER)


def _exporter(settings: TracingSettings) -> SpanExporter:
    # The exporters read the endpoint, headers, certificates and timeout from OTEL_* themselves.
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter()


class _CountingExporter(SpanExporter):
    """Counts what the wrapped exporter sent and what it failed to send."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        if _exported is not None:
            ok = result is SpanExportResult.SUCCESS
            _exported.labels("ok" if ok else "failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
