"""The outermost server interceptor: request ids, access logs, metrics and error statuses."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.trace import Span

from parley.chassis import tracing
from parley.chassis._handlers import CallScope, WrappingInterceptor, wrap_handler
from parley.chassis.errors import LimitExceeded, ServiceError, to_status
from parley.chassis.logs import request_id_var
from parley.chassis.malformed import MalformedRequest
from parley.chassis.metrics import GrpcServerMetrics, MethodMetrics, grpc_type
from parley.proto.contract import REQUEST_ID_KEY

__all__ = ["QUIET_SERVICES", "REQUEST_ID_KEY", "AccessLog", "ObservabilityInterceptor"]


_log = logging.getLogger("parley.rpc")

# Services whose calls are logged at DEBUG unless they fail on the server's side: the probes
# and the tools that list methods, which would otherwise fill the log.
QUIET_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class AccessLog:
    """Which calls get an access log line: every failed one, and `sample` of the successful
    ones (PARLEY_ACCESS_LOG_SAMPLE). The line of a sampled call says so: `sampled=<share>`."""

    __slots__ = ("fields", "sample")

    def __init__(self, sample: float = 1.0) -> None:
        self.sample = sample
        self.fields = {"sampled": f"{sample:g}"} if sample < 1.0 else None

    def drops(self) -> bool:
        """Whether to leave out the line of one more successful call."""
        return self.fields is not None and random.random() >= self.sample

    def describe(self) -> str:
        if self.fields is None:
            return "every call"
        return f"every failed call and {self.sample * 100:g}% of successful ones"


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class _ObservedCall(CallScope):
    """One call's request id, access log line, metrics and error status.

    The request id goes out in the initial metadata. A client-streaming call (one answer to
    many requests) gets it only once the call is admitted (see CallScope.admitted): a client
    that waits for the headers before writing then never writes into a call the server already
    refused, which grpcio's asyncio client would report as INTERNAL "Internal error from Core"
    in place of the real status. Such a call refused before that carries the request id in
    its trailers. Bidirectional streams get their headers at once: their handlers read from
    another task while they write, and grpc sends a stream's headers with its first message.
    """

    __slots__ = (
        "_access",
        "_context",
        "_headers_sent",
        "_method",
        "_metrics",
        "_quiet",
        "_request_id",
        "_defer_headers",
        "_span",
        "_start",
        "_traced",
    )

    def __init__(
        self,
        metrics: GrpcServerMetrics,
        method: MethodMetrics,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        defer_headers: bool,
        quiet: bool,
        access: AccessLog,
        traced: bool,
    ) -> None:
        self._quiet = quiet
        self._traced = traced
        self._span: Span | None = None
        self._access = access
        self._metrics = metrics
        self._method = method
        self._context = context
        self._request_id = _request_id(context.invocation_metadata())
        self._start = 0.0
        self._defer_headers = defer_headers
        self._headers_sent = False

    async def __aenter__(self) -> None:
        request_id_var.set(self._request_id)
        if self._traced:
            labels = self._method.labels
            self._span = tracing.start_server_span(
                f"/{labels[1]}/{labels[2]}", self._context.invocation_metadata()
            )
        self._start = time.perf_counter()
        self._method.started.inc()
        if not self._defer_headers:
            await self._send_headers()

    async def admitted(self) -> None:
        if not self._headers_sent:
            await self._send_headers()

    async def _send_headers(self) -> None:
        self._headers_sent = True
        await self._context.send_initial_metadata(((REQUEST_ID_KEY, self._request_id),))

    def _id_in_trailers(self) -> tuple[tuple[str, str], ...]:
        """The request id, for the trailers of a call that ends before its headers went out."""
        return () if self._headers_sent else ((REQUEST_ID_KEY, self._request_id),)

    def received(self, request: Any) -> None:
        self._method.msg_received.inc()
        if type(request) is MalformedRequest:
            raise request.error()

    def sent(self) -> None:
        self._method.msg_sent.inc()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context = self._context
        if exc is None:
            self._finish(context.code() or grpc.StatusCode.OK, "")
            return
        if isinstance(exc, ServiceError):
            if isinstance(exc, LimitExceeded):
                self._metrics.limit_refusals.labels(exc.limit).inc()
            self._finish(exc.code, exc.message)
            status = to_status(exc)
            await context.abort(
                status.code, status.details, (*status.trailing_metadata, *self._id_in_trailers())
            )
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._finish(code, "call ended by the client or its deadline")
            return
        if isinstance(exc, grpc.aio.AbortError):
            # The handler aborted by itself with an explicit status.
            self._finish(context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
            return
        if isinstance(exc, Exception):
            _log.error("unhandled error in %s", self._method.labels[2], exc_info=exc)
            self._finish(grpc.StatusCode.INTERNAL, "internal error")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error; see the server log for request id {self._request_id}",
                self._id_in_trailers(),
            )

    def _finish(self, code: grpc.StatusCode, message: str) -> None:
        elapsed = time.perf_counter() - self._start
        method = self._method
        method.handled[code].inc()
        span = self._span
        if span is None:
            method.handling_seconds.observe(elapsed)
            self._log_line(code, message, elapsed)
            return
        method.handling_seconds.observe(elapsed, tracing.exemplar())
        self._log_line(code, message, elapsed)
        tracing.end_server_span(span, code, message)

    def _log_line(self, code: grpc.StatusCode, message: str, elapsed: float) -> None:
        if code in _SERVER_FAULTS:
            level = logging.WARNING
        else:
            level = logging.DEBUG if self._quiet else logging.INFO
        if not _log.isEnabledFor(level):
            return
        extra = None
        if level == logging.INFO and code is grpc.StatusCode.OK:
            if self._access.drops():
                return
            extra = self._access.fields
        labels = self._method.labels
        _log.log(
            level,
            "rpc /%s/%s %s %.1fms%s",
            labels[1],
            labels[2],
            code.name,
            elapsed * 1000,
            f" {message}" if message else "",
            extra=extra,
        )


_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class ObservabilityInterceptor(WrappingInterceptor):
    """Tags each call with a request id, logs it, counts it and maps domain errors to statuses."""

    def __init__(
        self,
        metrics: GrpcServerMetrics,
        max_request_bytes: int = 0,
        access: AccessLog | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._max_request_bytes = max_request_bytes
        self._access = access if access is not None else AccessLog()

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        metrics = self._metrics
        access = self._access
        quiet = service in QUIET_SERVICES
        # Health and reflection are not traced: the probes would be most of the traces.
        traced = tracing.active() and not quiet
        method_metrics = metrics.method(
            grpc_type(handler.request_streaming, handler.response_streaming), service, name
        )
        return wrap_handler(
            handler,
            lambda context: _ObservedCall(
                metrics,
                method_metrics,
                context,
                defer_headers=handler.request_streaming and not handler.response_streaming,
                quiet=quiet,
                access=access,
                traced=traced,
            ),
            tolerant=True,
            max_request_bytes=self._max_request_bytes,
        )
