"""The OpenTelemetry SDK side of tracing: the provider, its sampler, span processor and OTLP
exporter. Imported only by `tracing.start_tracing`, so a service with tracing off never
imports the SDK (nor is stopped by a bad value of a variable only the SDK reads)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
    sampling,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["build_provider"]

# Longest attribute value kept: a statement's text, say. Nothing a caller sends is an
# attribute, and none of them may make an export batch exceed a collector's 4 MiB.
MAX_ATTRIBUTE_LENGTH = 1024

Count = Callable[[str, int], None]


def build_provider(settings: Any, service_name: str, version: str, count: Count) -> TracerProvider:
    """A tracer provider as `settings` (TracingSettings) say; `count(result, n)` is told of
    spans ended ("ended") and exported ("ok", "failed")."""
    # The instance is the host (a pod's name) and the process: replicas tell apart in a trace.
    instance = f"{socket.gethostname()}:{os.getpid()}"
    resource = Resource.create({SERVICE_VERSION: version, SERVICE_INSTANCE_ID: instance})
    # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins over the default.
    named = str(resource.attributes.get(SERVICE_NAME, ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(
        resource=resource,
        sampler=_RequestsOnly(_sampler(settings.sampler, settings.ratio), settings),
        span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_LENGTH),
        # Not at exit: tracing.stop_tracing flushes, within a bounded time.
        shutdown_on_exit=False,
    )
    batches = BatchSpanProcessor(
        _CountingExporter(_exporter(settings), count),
        max_queue_size=settings.queue,
        schedule_delay_millis=settings.delay_ms,
        max_export_batch_size=settings.batch,
    )
    provider.add_span_processor(_CountingProcessor(batches, count))
    return provider


def _sampler(name: str, ratio: float) -> sampling.Sampler:
    """The standard sampler `name` names (the SDK's own classes)."""
    root: sampling.Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


_ROOT_KINDS = (trace.SpanKind.SERVER, trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER)
_SAMPLE = sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)
_DROP = sampling.SamplingResult(sampling.Decision.DROP)


class _RequestsOnly(sampling.Sampler):
    """The configured sampler, with three rules of Parley's:

    - a root span other than a server, producer (a chat message sent) or consumer (its
      delivery) span is dropped: a health check's query, a sweep, a PING;
    - a consumer root with links (a chat delivery) is dropped unless a send it is linked to
      was sampled; then a parent-based sampler samples it (a path is whole or absent), and
      another one decides as for any root (a hint forged on Redis cannot force a span);
    - a span with a parent in this process follows it;
    - with plain `traceidratio`, a call that continues a caller's trace is sampled by a draw
      of this process, not by the trace id: a caller picks the trace id, and could pick ids
      the ratio always samples.
    """

    def __init__(self, inner: sampling.Sampler, settings: Any) -> None:
        self._inner = inner
        self._draw = settings.ratio if settings.sampler == "traceidratio" else None
        self._parent_based = settings.sampler.startswith("parentbased_")

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
        if not parent.is_valid:
            if kind not in _ROOT_KINDS:
                return _DROP
            if kind is trace.SpanKind.CONSUMER and links:
                if not any(link.context.trace_flags.sampled for link in links):
                    return _DROP
                if self._parent_based:
                    return _SAMPLE  # the send's decision, as a parent's would be followed
        elif not parent.is_remote:
            # Within this process every span follows its parent (the plain samplers would
            # decide each child by the trace id again, and tear traces apart).
            return sampling.SamplingResult(
                sampling.Decision.RECORD_AND_SAMPLE
                if parent.trace_flags.sampled
                else sampling.Decision.DROP,
                trace_state=parent.trace_state,
            )
        elif self._draw is not None:
            sampled = random.random() < self._draw
            return sampling.SamplingResult(
                sampling.Decision.RECORD_AND_SAMPLE if sampled else sampling.Decision.DROP,
                trace_state=parent.trace_state,
            )
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RequestsOnly{{{self._inner.get_description()}}}"


def _exporter(settings: Any) -> SpanExporter:
    """The OTLP exporter, to the endpoint Parley checked (its other variables, headers,
    certificates, timeout and compression, it reads itself)."""
    if settings.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=settings.http_traces_url())
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=settings.endpoint)


class _CountingExporter(SpanExporter):
    """Counts what the wrapped exporter sent and what it failed to send."""

    def __init__(self, inner: SpanExporter, count: Count) -> None:
        self._inner = inner
        self._count = count

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        self._count("ok" if result is SpanExportResult.SUCCESS else "failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _CountingProcessor(SpanProcessor):
    """Counts the sampled spans that ended, before the batch processor queues them (or drops
    them, when its queue is full): ended minus exported is what was dropped or still waits."""

    def __init__(self, inner: SpanProcessor, count: Count) -> None:
        self._inner = inner
        self._count = count

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._count("ended", 1)
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
