"""Client spans: one CLIENT span per call, and the call's trace context in its metadata.

When a channel is traced (`tracer_for`, asked when a client opens a channel, i.e. at its
first call to a target):

- a client given `tracer_provider=` traces with that provider;
- else it traces with the global provider once the application has installed one
  (`opentelemetry.trace.set_tracer_provider`, or `opentelemetry-instrument` with a distro);
- else, with only the API's default provider (which makes no spans), the channel gets no
  tracing interceptor at all: calls cost exactly what they did without tracing.

A span is named `/package.Service/Method`, as OpenTelemetry's gRPC instrumentation names the
server spans of Parley's services and the client spans of chat's calls, is a child of the
span current where the call was made (a root span when there is none), and ends when the call
ends, however its caller consumes it (a stream read to its end or not, cancelled or not). The
global propagator writes the context into the call's metadata: by default the W3C
`traceparent` (and `tracestate`, `baggage`), which Parley's servers read. Any status other than
OK marks the span as failed, except CANCELLED: the SDK ends the streams it no longer needs
by cancelling them.

These interceptors are the outermost of a channel, so the span covers the token's fetch too,
and the other interceptors hand the trace context on with their own metadata.
OpenTelemetry's own gRPC client interceptors are not used: the sync one turns a
server-streaming call into a bare generator (no `trailing_metadata()`, which paging needs),
and the asyncio one waits for a client-streaming call's status before handing the call over,
so a caller that writes with `call.write()` (the asyncio `import_users`) never gets to write.
For the same reasons an application run by `opentelemetry-instrument` must turn off that
instrumentation, which wraps every channel of the process, the SDK's too:
`OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=grpc_client,grpc_aio_client`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.util.types import AttributeValue

from parley.client._auth import CallDetails

__all__ = ["TracingInterceptor", "async_tracing_interceptors", "tracer_for"]

SCOPE = "parley.client"
"""The instrumentation scope of the SDK's spans."""

_Req = TypeVar("_Req")

# Not failures of the call as its caller sees it (see the module's docstring).
_NOT_FAILED = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)

# Asyncio calls report their status through a coroutine, so a finished call's span is ended
# by a task; the tasks are kept here until they are done (the loop holds only weak references).
_ending: set[asyncio.Task[None]] = set()


def tracer_for(provider: trace.TracerProvider | None, version: str) -> trace.Tracer | None:
    """The tracer of a channel's spans, or None when its calls are not traced (see above)."""
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
    return provider.get_tracer(SCOPE, version)


def _server_attributes(target: str) -> dict[str, AttributeValue]:
    """`server.address` and `server.port` of a `host:port` target; the whole target as the
    address for the other forms (a Unix socket, a list of addresses)."""
    text = target.removeprefix("dns:///")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:50051
    elif ":" in host or "," in text:  # ipv4:..., unix:..., dns://server/..., lists
        host = ""
    if sep and port.isdigit() and host:
        return {"server.address": host, "server.port": int(port)}
    return {"server.address": target}


class _Calls:
    """Starts the spans of the calls to one target."""

    def __init__(self, tracer: trace.Tracer, target: str) -> None:
        self._tracer = tracer
        self._server = _server_attributes(target)

    def start(self, method: str | bytes) -> trace.Span:
        if isinstance(method, bytes):  # grpc.aio hands over bytes (grpc/grpc#31092)
            method = method.decode()
        service, _, name = method.lstrip("/").partition("/")
        attributes: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            **self._server,
        }
        return self._tracer.start_span(
            f"/{service}/{name}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )


def _with_context(
    metadata: Iterable[tuple[str, str | bytes]] | None, span: trace.Span
) -> list[tuple[str, str | bytes]]:
    """`metadata` with the span's context in it (replacing any the caller sent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    kept = [(key, value) for key, value in metadata or () if key not in carrier]
    return [*kept, *carrier.items()]


def _end(span: trace.Span, code: grpc.StatusCode | None, details: str | None) -> None:
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in _NOT_FAILED:
            span.set_status(trace.StatusCode.ERROR, details or code.name)
    span.end()


def _end_raised(span: trace.Span, error: BaseException) -> None:
    """Ends the span of a call that could not start (the token's provider failed, say)."""
    span.record_exception(error)
    span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.end()


class _Outcome(Protocol):
    """What a sync interceptor's continuation returns: a grpc.Call and grpc.Future in one."""

    def code(self) -> grpc.StatusCode | None: ...

    def details(self) -> str | None: ...

    def exception(self) -> BaseException | None: ...

    def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...


def _end_sync(span: trace.Span, done: _Outcome) -> None:
    try:
        error = done.exception()
    except grpc.FutureCancelledError:  # cancelled by its caller: no error of its own
        error = None
    if error is not None and not isinstance(error, grpc.RpcError):
        _end_raised(span, error)  # an inner interceptor failed (the token's provider, say)
    else:
        _end(span, done.code(), done.details())


class TracingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A span for every call of a sync channel (`grpc.intercept_channel`, outermost)."""

    def __init__(self, tracer: trace.Tracer, target: str) -> None:
        self._calls = _Calls(tracer, target)

    def _traced(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        span = self._calls.start(details.method)
        traced = CallDetails(
            details.method,
            details.timeout,
            tuple(_with_context(details.metadata, span)),
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )
        try:
            outcome: _Outcome = continuation(traced, request)
        except BaseException as error:
            _end_raised(span, error)
            raise
        # Called at once when the call is over already, else from gRPC's thread when it ends.
        outcome.add_done_callback(functools.partial(_end_sync, span))
        return outcome

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return self._traced(continuation, client_call_details, request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return self._traced(continuation, client_call_details, request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        return self._traced(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        return self._traced(continuation, client_call_details, request_iterator)


async def _end_async(span: trace.Span, call: grpc.aio.Call) -> None:
    _end(span, await call.code(), await call.details())


def _end_when_done(loop: asyncio.AbstractEventLoop, span: trace.Span, call: grpc.aio.Call) -> None:
    task = loop.create_task(_end_async(span, call))
    _ending.add(task)
    task.add_done_callback(_ending.discard)


class _AsyncTracing:
    """The span-making part shared by the four asyncio interceptors."""

    def __init__(self, tracer: trace.Tracer, target: str) -> None:
        self._calls = _Calls(tracer, target)

    async def _traced(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        span = self._calls.start(details.method)
        traced = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*_with_context(details.metadata, span)),
            details.credentials,
            details.wait_for_ready,
        )
        try:
            call: grpc.aio.Call = await continuation(traced, request)
        except BaseException as error:
            _end_raised(span, error)
            raise
        # The call is handed over at once (a caller may still have to write to it), and its
        # span ends when it does.
        call.add_done_callback(functools.partial(_end_when_done, asyncio.get_running_loop(), span))
        return call


class _AsyncUnaryUnary(_AsyncTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Req], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return await self._traced(continuation, client_call_details, request)


class _AsyncUnaryStream(_AsyncTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Req], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return await self._traced(continuation, client_call_details, request)


class _AsyncStreamUnary(_AsyncTracing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]], Awaitable[Any]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


class _AsyncStreamStream(_AsyncTracing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]], Awaitable[Any]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


def async_tracing_interceptors(
    tracer: trace.Tracer, target: str
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace every call of a `grpc.aio` channel, one per call pattern
    (see `async_auth_interceptors`); put them first, so that they are the outermost."""
    return [
        _AsyncUnaryUnary(tracer, target),
        _AsyncUnaryStream(tracer, target),
        _AsyncStreamUnary(tracer, target),
        _AsyncStreamStream(tracer, target),
    ]
