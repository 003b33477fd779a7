"""A UserService with no database behind it, for tests of the chassis: a real `GrpcApp` on a
real port whose handlers run whatever behaviour a test installs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import (
    AuthSettings,
    DependencyCheck,
    Env,
    GrpcApp,
    ServerSettings,
    TokenVerifier,
    current_identity,
)
from parley.proto import user_pb2, user_pb2_grpc
from parley.testing.launcher import JWT_SECRET

__all__ = ["FAKE_ENV", "FakeUserService", "Running", "start_fake"]

USER_SERVICE = user_pb2.DESCRIPTOR.services_by_name["UserService"]

# Loopback, ports picked by the server, quick health checks, a short drain.
FAKE_ENV = {
    "PARLEY_GRPC_HOST": "127.0.0.1",
    "PARLEY_GRPC_PORT": "0",
    "PARLEY_METRICS_HOST": "127.0.0.1",
    "PARLEY_METRICS_PORT": "0",
    "PARLEY_HEALTH_CHECK_INTERVAL": "0.05",
    "PARLEY_SHUTDOWN_GRACE": "1",
    "PARLEY_JWT_SECRET": JWT_SECRET,
}

Context = grpc.aio.ServicerContext[Any, Any]


async def _whoami(request: user_pb2.GetUserRequest, context: Context) -> user_pb2.GetUserResponse:
    identity = current_identity()
    return user_pb2.GetUserResponse(
        user=user_pb2.User(id=request.id, name=identity.subject, email=" ".join(identity.scopes))
    )


async def _count_up(request: user_pb2.ListUsersRequest, context: Context) -> AsyncIterator[Any]:
    for i in range(request.page_size):
        yield user_pb2.User(id=i + 1)


async def _tally(requests: AsyncIterator[Any], context: Context) -> user_pb2.ImportUsersResponse:
    count = 0
    async for _ in requests:
        count += 1
    return user_pb2.ImportUsersResponse(created_count=count)


async def _delete(request: user_pb2.DeleteUserRequest, context: Context) -> Any:
    return user_pb2.DeleteUserResponse()


async def _unimplemented(request: Any, context: Context) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


class FakeUserService(user_pb2_grpc.UserServiceServicer):
    """Each RPC runs the behaviour a test put in the matching attribute.

    By default GetUser answers with the caller's subject as the user's name and its scopes
    as the email, ListUsers streams `page_size` users, ImportUsers counts what it reads,
    DeleteUser succeeds and the others are UNIMPLEMENTED. `entered` is set whenever any
    handler starts.
    """

    def __init__(self) -> None:
        self.get_user: Callable[..., Awaitable[Any]] = _whoami
        self.list_users: Callable[..., AsyncIterator[Any]] = _count_up
        self.import_users: Callable[..., Awaitable[Any]] = _tally
        self.delete_user: Callable[..., Awaitable[Any]] = _delete
        self.create_user: Callable[..., Awaitable[Any]] = _unimplemented
        self.update_user: Callable[..., Awaitable[Any]] = _unimplemented
        self.entered = asyncio.Event()

    async def GetUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.get_user(request, context)

    async def ListUsers(self, request: Any, context: Context) -> AsyncIterator[Any]:
        self.entered.set()
        async for item in self.list_users(request, context):
            yield item

    async def CreateUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.create_user(request, context)

    async def UpdateUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.update_user(request, context)

    async def DeleteUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.delete_user(request, context)

    async def ImportUsers(self, request_iterator: Any, context: Context) -> Any:
        self.entered.set()
        return await self.import_users(request_iterator, context)


@dataclass
class Running:
    """A started fake UserService with a client channel to it."""

    app: GrpcApp
    servicer: FakeUserService
    channel: grpc.aio.Channel
    stub: Any
    health: Any  # a HealthStub; its stubs' types are the sync ones
    stopped: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    async def stop(self) -> None:
        """Drains, as on SIGTERM."""
        self.stopped = True
        await self.app.stop()

    async def health_status(self, service: str = "") -> int:
        response = await self.health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(response.status)

    async def close(self) -> None:
        """Closes the channel and stops the server unless the test did."""
        await self.channel.close()
        if not self.stopped:
            await self.app.stop()
        # Also when a test failed while a stop of its own was still under way.
        await self.app.server.stop(0)


async def start_fake(
    *,
    checks: Sequence[DependencyCheck] = (),
    auth: AuthSettings | None = None,
    before_start: Callable[[GrpcApp], None] | None = None,
    **env: str,
) -> Running:
    """Starts a fake UserService: `checks` are its dependency probes, `auth` its token
    settings (default: HS256 with the launcher's JWT_SECRET), `before_start` is called with
    the app before it starts, and `env` overrides FAKE_ENV's PARLEY_* settings."""
    values = Env({**FAKE_ENV, **env})
    settings = ServerSettings.from_env(values, default_port=0, default_metrics_port=0)
    app = GrpcApp(
        settings,
        services=[USER_SERVICE],
        verifier=TokenVerifier(auth or AuthSettings.from_env(values)),
        checks=checks,
    )
    servicer = FakeUserService()
    user_pb2_grpc.add_UserServiceServicer_to_server(servicer, app.server)
    if before_start is not None:
        before_start(app)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Running(
        app=app,
        servicer=servicer,
        channel=channel,
        stub=user_pb2_grpc.UserServiceStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
    )
