"""Client interceptors that put `authorization: Bearer <token>` on every call.

One class per channel kind covers all four call patterns (unary-unary, unary-stream,
stream-unary, stream-stream). The token provider is asked on every call, so a refreshing
provider takes effect at once. A caller's own `authorization` metadata on a call wins.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from parley.client.tokens import TokenProvider

__all__ = ["AuthInterceptor", "CallDetails", "async_auth_interceptors"]

_AUTHORIZATION = "authorization"

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _has_authorization(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    return any(key == _AUTHORIZATION for key, _ in metadata or ())


class CallDetails(grpc.ClientCallDetails):
    """grpc.ClientCallDetails is abstract; interceptors hand on their own implementation."""

    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: tuple[tuple[str, str | bytes], ...] | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a sync channel (`grpc.intercept_channel`)."""

    def __init__(self, token: TokenProvider) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if _has_authorization(details.metadata):
            return details
        metadata = (*(details.metadata or ()), (_AUTHORIZATION, f"Bearer {self._token()}"))
        return CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Req], Any],
        client_call_details: grpc.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Req]], Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Req],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _AsyncAuth:
    """The token-adding part shared by the four asyncio interceptors."""

    def __init__(self, token: TokenProvider) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if _has_authorization(details.metadata):
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(_AUTHORIZATION, f"Bearer {self._token()}")
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


class _AsyncUnaryUnary(_AsyncAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Req], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AsyncUnaryStream(_AsyncAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Req], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Req,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AsyncStreamUnary(_AsyncAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]], Awaitable[Any]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AsyncStreamStream(_AsyncAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]], Awaitable[Any]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def async_auth_interceptors(token: TokenProvider) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that add the token to every call of a `grpc.aio` channel.

    One per call pattern: grpc.aio files an interceptor under the first pattern it implements
    only, so a single object implementing all four would see unary-unary calls alone.
    """
    return [
        _AsyncUnaryUnary(token),
        _AsyncUnaryStream(token),
        _AsyncStreamUnary(token),
        _AsyncStreamStream(token),
    ]
