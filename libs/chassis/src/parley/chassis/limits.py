"""Admission limits: how many calls one connection, and the whole replica, may hold open.

A call holds its place until grpc has finished it, past the handler's return: a unary call
whose client does not read its answer keeps holding it, and its answer, until the client
reads, resets the stream or the connection goes.

Each refusal is a LimitExceeded (RESOURCE_EXHAUSTED naming the limit and its setting), which
the observability interceptor counts in `parley_limit_refusals_total{limit}`.
"""

from __future__ import annotations

from typing import Any

import grpc

from parley.chassis._handlers import CallScope, WrappingInterceptor, wrap_handler
from parley.chassis.config import ServerSettings
from parley.chassis.errors import LimitExceeded

__all__ = [
    "CHASSIS_LIMITS",
    "HEALTH_SERVICE_NAME",
    "HEALTH_WATCHES_PER_CONNECTION",
    "HEALTH_WATCHES_PER_REPLICA",
    "STREAMS_PER_CONNECTION",
    "STREAMS_PER_REPLICA",
    "UNARY_CALLS_PER_REPLICA",
    "LimitsInterceptor",
    "Quota",
]

_HEALTH = "grpc.health.v1.Health"

# The `limit` label of each refusal the chassis makes.
STREAMS_PER_CONNECTION = "streams_per_connection"
STREAMS_PER_REPLICA = "streams_per_replica"
UNARY_CALLS_PER_REPLICA = "unary_calls_per_replica"
HEALTH_SERVICE_NAME = "health_service_name"
HEALTH_WATCHES_PER_CONNECTION = "health_watches_per_connection"
HEALTH_WATCHES_PER_REPLICA = "health_watches_per_replica"
CHASSIS_LIMITS = (
    STREAMS_PER_CONNECTION,
    STREAMS_PER_REPLICA,
    UNARY_CALLS_PER_REPLICA,
    HEALTH_SERVICE_NAME,
    HEALTH_WATCHES_PER_CONNECTION,
    HEALTH_WATCHES_PER_REPLICA,
)


class Quota:
    """Things held open per key (a connection, a user, ...), at most `limit` for each key."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[Any, int] = {}

    def take(self, key: Any) -> bool:
        """Counts one more for `key`; False (and nothing counted) when it already has `limit`."""
        held = self._counts.get(key, 0)
        if held >= self.limit:
            return False
        self._counts[key] = held + 1
        return True

    def give_back(self, key: Any) -> None:
        held = self._counts.get(key, 0) - 1
        if held > 0:
            self._counts[key] = held
        else:
            self._counts.pop(key, None)

    def held(self, key: Any) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """How many keys hold anything."""
        return len(self._counts)


class _Admission(CallScope):
    """Holds a place on the caller's connection, and on the replica for the kind of call it
    is, from its start until grpc has finished it: past the handler's return, while the
    response still waits for the client to read it."""

    __slots__ = ("_context", "_kind", "_limits")

    def __init__(
        self,
        limits: LimitsInterceptor,
        context: grpc.aio.ServicerContext[Any, Any],
        kind: Quota | None,
    ) -> None:
        self._limits = limits
        self._context = context
        self._kind = kind  # the replica's quota of streams or of unary calls (None: neither)

    async def __aenter__(self) -> None:
        limits = self._limits
        # The peer (ipv4:address:port) names one TCP connection: calls share it as HTTP/2 streams.
        peer = self._context.peer()
        if not limits.per_connection.take(peer):
            raise LimitExceeded(
                STREAMS_PER_CONNECTION,
                "PARLEY_MAX_STREAMS_PER_CONNECTION",
                limits.per_connection.limit,
                "too many calls open at once on this connection; wait for one to end "
                "or open another connection",
            )
        kind = self._kind
        if kind is not None and not kind.take(None):
            limits.per_connection.give_back(peer)
            if kind is limits.streams:
                raise LimitExceeded(
                    STREAMS_PER_REPLICA,
                    "PARLEY_MAX_STREAMS",
                    kind.limit,
                    "this replica holds as many streams as it may; retry later or on another "
                    "replica",
                )
            raise LimitExceeded(
                UNARY_CALLS_PER_REPLICA,
                "PARLEY_MAX_UNARY_CALLS",
                kind.limit,
                "this replica holds as many calls as it may (answers not yet read count); "
                "retry later or on another replica",
            )

        def release(_: grpc.aio.ServicerContext[Any, Any]) -> None:
            limits.per_connection.give_back(peer)
            if kind is not None:
                kind.give_back(None)

        # grpc calls this once the call is over however it ended (a response written, an
        # error, a cancellation), so a response the client never reads keeps its place.
        self._context.add_done_callback(release)  # type: ignore[arg-type]  # stubs want a class


class LimitsInterceptor(WrappingInterceptor):
    """Refuses a call beyond PARLEY_MAX_STREAMS_PER_CONNECTION on its connection, a
    streaming call (reflection's too) beyond PARLEY_MAX_STREAMS on the replica, and a unary
    call beyond PARLEY_MAX_UNARY_CALLS on the replica.

    Health calls count per connection only here; the health service has limits of its own
    (BoundedHealthServicer), so that probes never compete with the service's calls.
    """

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__()
        self.per_connection = Quota(settings.max_streams_per_connection)
        self.streams = Quota(settings.max_streams)
        self.unary_calls = Quota(settings.max_unary_calls)

    def open_streams(self) -> int:
        return self.streams.held(None)

    def open_unary_calls(self) -> int:
        return self.unary_calls.held(None)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        kind: Quota | None = None
        if method.lstrip("/").partition("/")[0] != _HEALTH:
            streaming = handler.request_streaming or handler.response_streaming
            kind = self.streams if streaming else self.unary_calls
        return wrap_handler(handler, lambda context: _Admission(self, context, kind))
