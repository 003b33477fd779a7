"""What the sync and asyncio clients share: targets, channels, deadlines, errors and health."""

from __future__ import annotations

import enum
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Generic, Self, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2
from opentelemetry import trace

from parley.client._channel import (
    DEFAULT_TIMEOUT,
    ChannelSpec,
    ServiceSpec,
    channel_options,
    credentials_for,
    open_async_channel,
    open_sync_channel,
    parse_targets,
    resolve_target,
)
from parley.client.errors import CallContext, ParleyError, Unavailable, error_from_rpc
from parley.client.tokens import TokenProvider, resolve_token

__all__ = ["AsyncClientBase", "HealthStatus", "SyncClientBase"]

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# grpcio's details for a call that never left the client: safe to send to another target,
# even when the method is not idempotent.
_NEVER_SENT = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "no address",
)

_T = TypeVar("_T")
_C = TypeVar("_C")


class HealthStatus(enum.Enum):
    """A `grpc.health.v1` serving status."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


def _never_sent(error: ParleyError) -> bool:
    lowered = error.message.lower()
    return isinstance(error, Unavailable) and any(marker in lowered for marker in _NEVER_SENT)


class _Targets(Generic[_C]):
    """The targets of a client, each with its channel opened on first use.

    Calls go to the current target. When several were given, a call that cannot reach the
    current one moves the client on to the next, round the list.
    """

    def __init__(self, text: str, open_channel: Callable[[str], _C]) -> None:
        self.text = text
        self.targets = parse_targets(text)
        self._open = open_channel
        self._channels: dict[int, _C] = {}
        self.index = 0
        # Sync clients are shared between threads: one channel per target, whoever asks first.
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return self.targets[self.index]

    def channel(self) -> _C:
        with self._lock:
            channel = self._channels.get(self.index)
            if channel is None:
                channel = self._channels[self.index] = self._open(self.current)
            return channel

    def advance(self) -> bool:
        """Moves to the next target; False when there is only one."""
        if len(self.targets) < 2:
            return False
        with self._lock:
            self.index = (self.index + 1) % len(self.targets)
        return True

    def opened(self) -> list[_C]:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        return channels


class _ClientCore:
    """Configuration shared by the sync and asyncio bases."""

    _service: ServiceSpec

    def __init__(
        self,
        target: str | Sequence[str] | None,
        *,
        token: str | TokenProvider | None,
        timeout: float | None,
        wait_for_ready: bool,
        tls: bool | grpc.ChannelCredentials,
        options: Sequence[tuple[str, str | int]],
        tracer_provider: trace.TracerProvider | None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._text = resolve_target(target, self._service)
        self._token = resolve_token(token)
        self._timeout = timeout
        self._wait_for_ready = wait_for_ready
        self._credentials = credentials_for(tls)
        self._options = channel_options(self._service, options)
        self._tracer_provider = tracer_provider

    def _spec(self, target: str) -> ChannelSpec:
        return ChannelSpec(
            target, self._options, self._credentials, self._token, self._tracer_provider
        )

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds (None: no deadline)."""
        return self._timeout

    @property
    def token_provider(self) -> TokenProvider | None:
        """What every call asks for its token (None: calls carry no token)."""
        return self._token

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _ready(self, wait_for_ready: bool | None) -> bool:
        return self._wait_for_ready if wait_for_ready is None else wait_for_ready

    def _context(self, target: str, method: str, timeout: float | None) -> CallContext:
        return CallContext(
            target=target,
            method=f"/{self._service.name}/{method}" if "/" not in method else method,
            address_env=self._service.address_env,
            timeout=timeout,
            token_sent=self._token is not None,
        )


class SyncClientBase(_ClientCore):
    """Base of the sync clients: a channel per target, closed by `close()` or `with`."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        token: str | TokenProvider | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
        tls: bool | grpc.ChannelCredentials = False,
        options: Sequence[tuple[str, str | int]] = (),
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        super().__init__(
            target,
            token=token,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            tls=tls,
            options=options,
            tracer_provider=tracer_provider,
        )
        self._targets: _Targets[grpc.Channel] = _Targets(
            self._text, lambda t: open_sync_channel(self._spec(t))
        )

    @property
    def target(self) -> str:
        """The address (or comma-separated addresses) this client talks to."""
        return self._targets.text

    def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._targets.opened():
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self._timeout!r})"

    @contextmanager
    def _errors(self, method: str, timeout: float | None) -> Iterator[str]:
        """Turns a grpc.RpcError raised inside into the matching ParleyError."""
        target = self._targets.current
        try:
            yield target
        except grpc.RpcError as rpc_error:
            error = error_from_rpc(rpc_error, self._context(self._targets.text, method, timeout))
            if isinstance(error, Unavailable):
                self._targets.advance()
            raise error from None

    def _call(
        self,
        method: str,
        timeout: float | None,
        invoke: Callable[[grpc.Channel], _T],
        *,
        idempotent: bool,
    ) -> _T:
        """Runs `invoke` on the current channel; with several targets, tries each in turn while
        the call cannot reach them (and, when `idempotent`, while the connection drops)."""
        for attempt in range(len(self._targets.targets)):
            try:
                with self._errors(method, timeout):
                    return invoke(self._targets.channel())
            except Unavailable as error:
                last = attempt == len(self._targets.targets) - 1
                if last or not (idempotent or _never_sent(error)):
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def health(
        self,
        service: str | None = None,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> HealthStatus:
        """The `grpc.health.v1` status of `service` at the server (needs no token).

        `service` None asks for this client's service (its readiness, e.g. `user.UserService`);
        "" asks for the server as a whole (liveness). Raises `NotFound` for a service name the
        server does not know. Retried on UNAVAILABLE. With `wait_for_ready=True` the check waits
        (up to its deadline) for the server to come up instead of failing at once, which suits
        scripts that start right after the stack.
        """
        name = self._service.name if service is None else service
        deadline = self._deadline(timeout)

        def invoke(channel: grpc.Channel) -> HealthStatus:
            check = channel.unary_unary(
                _HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = check(
                health_pb2.HealthCheckRequest(service=name),
                timeout=deadline,
                wait_for_ready=self._ready(wait_for_ready),
            )
            return HealthStatus(reply.status)

        return self._call(_HEALTH_CHECK, deadline, invoke, idempotent=True)


class AsyncClientBase(_ClientCore):
    """Base of the asyncio clients: a `grpc.aio` channel per target, closed by `close()` or
    `async with`. Create and use a client in one event loop."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        token: str | TokenProvider | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
        tls: bool | grpc.ChannelCredentials = False,
        options: Sequence[tuple[str, str | int]] = (),
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        super().__init__(
            target,
            token=token,
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            tls=tls,
            options=options,
            tracer_provider=tracer_provider,
        )
        self._targets: _Targets[grpc.aio.Channel] = _Targets(
            self._text, lambda t: open_async_channel(self._spec(t))
        )

    @property
    def target(self) -> str:
        """The address (or comma-separated addresses) this client talks to."""
        return self._targets.text

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled."""
        for channel in self._targets.opened():
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self._timeout!r})"

    @asynccontextmanager
    async def _errors(self, method: str, timeout: float | None) -> AsyncIterator[str]:
        """Turns a grpc.RpcError raised inside into the matching ParleyError."""
        target = self._targets.current
        try:
            yield target
        except grpc.RpcError as rpc_error:
            error = error_from_rpc(rpc_error, self._context(self._targets.text, method, timeout))
            if isinstance(error, Unavailable):
                self._targets.advance()
            raise error from None

    async def _call(
        self,
        method: str,
        timeout: float | None,
        invoke: Callable[[grpc.aio.Channel], Awaitable[_T]],
        *,
        idempotent: bool,
    ) -> _T:
        """Awaits `invoke` on the current channel; with several targets, tries each in turn
        while the call cannot reach them (and, when `idempotent`, while the connection drops)."""
        for attempt in range(len(self._targets.targets)):
            try:
                async with self._errors(method, timeout):
                    return await invoke(self._targets.channel())
            except Unavailable as error:
                last = attempt == len(self._targets.targets) - 1
                if last or not (idempotent or _never_sent(error)):
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    async def health(
        self,
        service: str | None = None,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> HealthStatus:
        """The `grpc.health.v1` status of `service` at the server (needs no token).

        `service` None asks for this client's service (its readiness, e.g. `user.UserService`);
        "" asks for the server as a whole (liveness). Raises `NotFound` for a service name the
        server does not know. Retried on UNAVAILABLE. With `wait_for_ready=True` the check waits
        (up to its deadline) for the server to come up instead of failing at once.
        """
        name = self._service.name if service is None else service
        deadline = self._deadline(timeout)

        async def invoke(channel: grpc.aio.Channel) -> HealthStatus:
            check = channel.unary_unary(
                _HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await check(
                health_pb2.HealthCheckRequest(service=name),
                timeout=deadline,
                wait_for_ready=self._ready(wait_for_ready),
            )
            return HealthStatus(reply.status)

        return await self._call(_HEALTH_CHECK, deadline, invoke, idempotent=True)
