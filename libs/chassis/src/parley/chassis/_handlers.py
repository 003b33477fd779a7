"""Wraps any gRPC method handler, of all four call patterns, in a per-call scope.

Both chassis interceptors (observability and auth) need the same thing: run code before
the call, see every message in and out, and run code after the call however it ends.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc

from parley.chassis.malformed import tolerant as tolerant_deserializer

__all__ = ["CallScope", "WrappedHandlers", "WrappingInterceptor", "wrap_handler"]


class CallScope:
    """Entered before a call's behaviour runs and exited when it ends; override what you need.

    `__aexit__` may raise to replace the call's exception (for example to abort with a status).
    """

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def admitted(self) -> None:
        """The call got past every check: its handler asks for its first request, or (a
        client-streaming call) is about to answer. Request-streaming calls only; may run more
        than once, and from another task than the handler's."""

    def received(self, request: Any) -> None:
        """One request message was read; may raise to refuse it."""

    def sent(self) -> None:
        """One response message was written."""


ScopeFactory = Callable[[grpc.aio.ServicerContext[Any, Any]], CallScope]


async def _counted(requests: AsyncIterator[Any], scope: CallScope) -> AsyncIterator[Any]:
    await scope.admitted()
    async for request in requests:
        scope.received(request)
        yield request


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    make_scope: ScopeFactory,
    *,
    tolerant: bool = False,
    max_request_bytes: int = 0,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of `handler` whose behaviour runs inside `make_scope(context)`.

    With `tolerant`, a request that does not parse, or is larger than `max_request_bytes`,
    reaches the scope's `received` as a MalformedRequest instead of being answered by grpcio
    before any of our code runs.
    """
    deserializer = handler.request_deserializer
    if tolerant:
        deserializer = tolerant_deserializer(deserializer, max_request_bytes)
    kwargs: dict[str, Any] = {
        "request_deserializer": deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            scope = make_scope(context)
            async with _Entered(scope):
                scope.received(request)
                response = await inner_uu(request, context)
                scope.sent()
                return response

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)

    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            scope = make_scope(context)
            async with _Entered(scope):
                response = await inner_su(_counted(requests, scope), context)
                await scope.admitted()
                scope.sent()
                return response

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream
        if inspect.isasyncgenfunction(inner_us):

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                scope = make_scope(context)
                async with _Entered(scope):
                    scope.received(request)
                    async for response in inner_us(request, context):
                        scope.sent()
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

        async def unary_stream_writer(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            # Handlers that call context.write() (such as health Watch) are not generators.
            scope = make_scope(context)
            async with _Entered(scope):
                scope.received(request)
                await inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream_writer, **kwargs)

    inner_ss: Any = handler.stream_stream
    assert inner_ss is not None
    if inspect.isasyncgenfunction(inner_ss):

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            scope = make_scope(context)
            async with _Entered(scope):
                async for response in inner_ss(_counted(requests, scope), context):
                    scope.sent()
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)

    async def stream_stream_writer(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        scope = make_scope(context)
        async with _Entered(scope):
            await inner_ss(_counted(requests, scope), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream_writer, **kwargs)


class WrappedHandlers:
    """An interceptor's wrapped handlers, made once per method instead of once per call.

    An entry is used only while the method's inner handler is the very object it was made
    from. Bounded: when it holds `limit` methods it starts afresh.
    """

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._entries: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        entry = self._entries.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        return None

    def put(
        self,
        method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        wrapped: grpc.RpcMethodHandler[Any, Any],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[method] = (handler, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that hands grpc a wrapped copy of each method's handler, made
    once per method by `wrap` and reused (see WrappedHandlers)."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to use for `method` (`/package.Service/Method`) instead of `handler`."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        name = handler_call_details.method
        wrapped = self._wrapped.get(name, handler)
        if wrapped is None:
            wrapped = self._wrapped.put(name, handler, self.wrap(name, handler))
        return wrapped


class _Entered:
    """Async context manager over a CallScope whose __aenter__ failure is also seen by __aexit__."""

    __slots__ = ("_scope",)

    def __init__(self, scope: CallScope) -> None:
        self._scope = scope

    async def __aenter__(self) -> None:
        try:
            await self._scope.__aenter__()
        except BaseException as exc:
            await self._scope.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        await self._scope.__aexit__(exc_type, exc, tb)
        return False
