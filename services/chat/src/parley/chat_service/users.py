"""Sender names from UserService, over gRPC: the service-to-service call of Parley.

Deadlines on every call, retries on UNAVAILABLE through the service config, client-side
round_robin (give a `dns:///` target, such as a Kubernetes headless service), and a short
cache whose stale entries keep the chat going for known users while UserService cannot
answer, for a bounded time.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from parley.chassis import FailedPrecondition, NotFound, Unavailable, tracing
from parley.proto import contract, user_pb2, user_pb2_grpc
from parley.proto.contract import service_config

__all__ = ["USER_SERVICE", "UserDirectory", "unknown_sender"]

USER_SERVICE = "user-service"
# Names kept at most; every chat call looks its caller up, so the cache is bounded.
_CACHE_LIMIT = 100_000


def unknown_sender(user_id: int) -> FailedPrecondition:
    """The refusal of a caller, or of an open stream, whose token's user does not exist."""
    return FailedPrecondition(
        f"user {user_id} of the token does not exist in UserService", reason="UNKNOWN_SENDER"
    )


class UserDirectory:
    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        cache_ttl: float,
        max_stale: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._timeout = timeout
        self._cache_ttl = cache_ttl
        self._max_stale = max_stale
        self._cache: dict[int, tuple[str, float]] = {}
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", service_config(contract.USER_SERVICE, methods=["GetUser"])),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # grpcio's reconnect backoff grows to two minutes by default: a chat replica
            # would keep reporting UserService down long after it came back.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        traced = tracing.client_interceptors()
        self._channel = (
            grpc.aio.insecure_channel(target, options=options, interceptors=traced)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options, interceptors=traced)
        )
        self._stub = user_pb2_grpc.UserServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def probe(self) -> None:
        """Raises unless UserService reports itself ready."""
        reply = await self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=contract.USER_SERVICE), timeout=self._timeout)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("UserService is not serving")

    async def display_name(self, user_id: int, token: str) -> str:
        """The caller's name, looked up with their own token; FAILED_PRECONDITION when the
        token's user does not exist."""
        name = await self._name(user_id, token)
        if name is None:
            raise unknown_sender(user_id)
        return name

    async def exists(self, user_id: int, token: str) -> bool:
        """Whether UserService still has the user (from the cache while it is fresh).
        Raises Unavailable when that cannot be told."""
        return await self._name(user_id, token) is not None

    async def require(self, user_id: int, token: str) -> None:
        """NOT_FOUND unless UserService has user `user_id` (asked with the caller's token)."""
        if await self._name(user_id, token) is None:
            raise NotFound(f"user {user_id} does not exist", reason="UNKNOWN_USER")

    async def _name(self, user_id: int, token: str) -> str | None:
        """The user's name (None when UserService has no such user), from the cache while it
        is fresh; a stale entry keeps a known user's calls going while UserService cannot
        answer, for at most `max_stale` past its freshness (open streams are another matter:
        see senders.py)."""
        cached = self._cache.get(user_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._cache_ttl:
            return cached[0]
        try:
            reply = await self._stub.GetUser(
                user_pb2.GetUserRequest(id=user_id),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                self._cache.pop(user_id, None)
                return None
            if cached is not None and now - cached[1] < self._cache_ttl + self._max_stale:
                return cached[0]  # degraded: a stale name beats no chat
            raise Unavailable(USER_SERVICE, f"{error.code().name}: {error.details()}") from None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[user_id] = (reply.user.name, now)
        return reply.user.name
