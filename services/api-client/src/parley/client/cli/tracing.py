"""`parley --trace`: every call of the command is traced, and its trace id printed.

For each call, as it starts, one line goes to stderr (stdout stays what scripts parse):

    trace 4bf92f3577b34da6a3ce929d0e0e4736 /user.UserService/CreateUser

Each call is a trace of its own: its CLIENT span is the root, always sampled, and its W3C
`traceparent` goes to the server with the call. A server that traces joins that trace (its
default sampler follows the caller), so its spans, its log lines (`trace_id=...`) and the
exemplars of its latency histograms carry the id printed here (health checks excepted: the
services never trace those). With the server's tracing off, the id still finds the call's
own span in the trace store when the spans are exported: its duration, status and the
address it went to, as the command saw them.

Where the spans go follows the rules of the services (parley.chassis.tracing), read here
because parley-client does not depend on the chassis:

- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): an http:// or
  https:// URL; `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `grpc` (the
  default) or `http/protobuf`. The exporter reads its other variables itself (headers,
  certificates, `OTEL_EXPORTER_OTLP_TIMEOUT`).
- `OTEL_TRACES_EXPORTER=otlp` exports to the exporter's default endpoint; `none`, or
  `OTEL_SDK_DISABLED=true`, exports nothing. Without any of them `--trace` prints the ids only.

The resource's `service.name` is `parley-cli`, whatever OTEL_SERVICE_NAME says, and
OTEL_TRACES_SAMPLER does not apply: `--trace` asks for every call. A variable that is not
valid is a usage error (exit 2) before any call is made. A collector that cannot be reached
does not fail the command: its output and exit status stay those of its calls, and one line
at the end says the spans were not exported. The spans still queued are sent when the command
ends, which waits for the exporter at most its timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by
default).

The OpenTelemetry SDK is imported only when `--trace` is given: other commands start without it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry import context, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from parley.client._tracing import SCOPE

__all__ = ["CLI_SERVICE_NAME", "Export", "Tracing"]

CLI_SERVICE_NAME = "parley-cli"

_PROTOCOLS = ("grpc", "http/protobuf")


def _variable(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _first_set(environ: Mapping[str, str], *names: str) -> tuple[str, str | None]:
    """The first of `names` that is set, and its value (the last name when none is)."""
    for name in names:
        value = _variable(environ, name)
        if value is not None:
            return name, value
    return names[-1], None


@dataclass(frozen=True)
class Export:
    """Where `--trace` sends its spans: `protocol` None means nowhere."""

    protocol: str | None = None
    endpoint: str | None = None
    """The endpoint as given; None: the exporter's default."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Export:
        """Reads the standard variables (see the module's docstring); raises ValueError, with
        the variable's name, for a value that is not valid."""
        disabled = (_variable(environ, "OTEL_SDK_DISABLED") or "false").lower()
        if disabled not in ("true", "false"):
            raise ValueError(f"OTEL_SDK_DISABLED must be true or false, got {disabled!r}")
        exporter = _variable(environ, "OTEL_TRACES_EXPORTER")
        if exporter is not None and exporter.lower() not in ("otlp", "none"):
            raise ValueError(
                f"OTEL_TRACES_EXPORTER must be otlp or none (parley exports OTLP), got {exporter!r}"
            )
        name, endpoint = _first_set(
            environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{name} must be an http:// or https:// URL, got {endpoint!r}")
        name, protocol = _first_set(
            environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = protocol or "grpc"
        if protocol not in _PROTOCOLS:
            raise ValueError(f"{name} must be grpc or http/protobuf, got {protocol!r}")
        off = disabled == "true" or (exporter or "").lower() == "none"
        if off or (exporter is None and endpoint is None):
            return cls()
        return cls(protocol, endpoint)

    def describe(self) -> str:
        return f"{self.endpoint or 'the default endpoint'} (OTLP {self.protocol})"


class _PrintTraceIds(SpanProcessor):
    """Prints `trace <trace id> <span name>` on stderr as each call's span starts."""

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        scope = span.instrumentation_scope
        if span.kind is trace.SpanKind.CLIENT and scope is not None and scope.name == SCOPE:
            # sys.stderr as it is now: the interactive chat prints through prompt_toolkit's.
            print(f"trace {span.context.trace_id:032x} {span.name}", file=sys.stderr, flush=True)


class _Watched(SpanExporter):
    """The exporter, counting the spans it failed to send."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.lost = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            logging.getLogger(__name__).debug("exporting spans failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.lost += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _exporter(protocol: str) -> SpanExporter:
    # Both read the endpoint, headers, certificates and timeout from the OTEL_* variables.
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter()


class Tracing:
    """The tracer provider of one `parley --trace` run; `finish()` when the command ends."""

    def __init__(self, export: Export) -> None:
        self.export = export
        # The exporters log every failed attempt; the line `finish` prints says it once
        # (--debug, which logs to stderr, shows them).
        exporters_log = logging.getLogger("opentelemetry")
        if not any(isinstance(h, logging.NullHandler) for h in exporters_log.handlers):
            exporters_log.addHandler(logging.NullHandler())
        self.provider = TracerProvider(
            sampler=sampling.ALWAYS_ON,
            resource=Resource.create({SERVICE_NAME: CLI_SERVICE_NAME}),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(_PrintTraceIds())
        self._exporter: _Watched | None = None
        if export.protocol is not None:
            self._exporter = _Watched(_exporter(export.protocol))
            self.provider.add_span_processor(BatchSpanProcessor(self._exporter))

    def finish(self) -> None:
        """Sends the spans not sent yet; says so, in one line on stderr, when some were lost."""
        self.provider.shutdown()
        if self._exporter is not None and self._exporter.lost:
            print(
                f"parley: warning: --trace could not export {self._exporter.lost} span(s) to "
                f"{self.export.describe()}; run with --debug to see why",
                file=sys.stderr,
                flush=True,
            )
