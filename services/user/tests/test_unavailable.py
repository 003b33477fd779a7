"""Postgres down: the service keeps running, says NOT_SERVING, and answers UNAVAILABLE."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.devstack.postgres import EmbeddedPostgres
from parley.proto import user_pb2, user_pb2_grpc
from parley.user_service import SERVICE_NAME
from parley.user_service.migrations import apply_migrations

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST_FAIL = {"PARLEY_DB_POOL_TIMEOUT": "1s", "PARLEY_HEALTH_CHECK_INTERVAL": "0.2"}


def calls(stub, auth):
    """One call of every RPC, each awaitable on its own."""
    user = user_pb2.User(id=1, name="New")
    rows = [user_pb2.CreateUserRequest(name="A", email="a@example.com", age=1)]

    async def list_users():
        return [u async for u in stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth)]

    return {
        "GetUser": stub.GetUser(user_pb2.GetUserRequest(id=1), metadata=auth),
        "ListUsers": list_users(),
        "CreateUser": stub.CreateUser(rows[0], metadata=auth),
        "UpdateUser": stub.UpdateUser(user_pb2.UpdateUserRequest(user=user), metadata=auth),
        "DeleteUser": stub.DeleteUser(user_pb2.DeleteUserRequest(id=1), metadata=auth),
        "ImportUsers": stub.ImportUsers(iter(rows), metadata=auth),
    }


def assert_postgres_unavailable(details, error: grpc.RpcError) -> None:
    found = details(error)
    assert found.code == grpc.StatusCode.UNAVAILABLE, (found.code, found.message)
    assert found.message.startswith("postgres is unavailable"), found.message
    assert "Traceback" not in found.message
    assert "\n" not in found.message
    assert found.reason == "DEPENDENCY_UNAVAILABLE"
    assert found.metadata == {"dependency": "postgres"}


async def test_unreachable_postgres_is_unavailable_not_an_internal_error(
    start_server, unused_port, auth, health, details
):
    app = await start_server(f"postgresql://postgres@127.0.0.1:{unused_port}/parley", **FAST_FAIL)

    assert await health(app.port, "") == SERVING
    assert await health(app.port, SERVICE_NAME) == NOT_SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        pending = calls(stub, auth)
        results = await asyncio.gather(*pending.values(), return_exceptions=True)

    for rpc, result in zip(pending, results, strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), f"{rpc} returned {result!r}"
        assert_postgres_unavailable(details, result)
    assert app.monitor.failures.keys() == {"postgres"}


# --- A private Postgres that the test stops and starts -----------------------------------


@pytest.fixture
def private_postgres(unused_port) -> Iterator[EmbeddedPostgres]:
    """A throwaway cluster of devstack's on a free port (as root it runs as `nobody`)."""
    # Not under tmp_path: pytest runs of other checkouts prune old basetemp directories.
    directory = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    server = EmbeddedPostgres(
        directory / "data", unused_port, log_path=directory / "postgres.log", durable=False
    )
    try:
        server.start(timeout=60)
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(40)
async def test_postgres_going_away_and_coming_back(
    private_postgres, start_server, auth, health, details, wait_for
):
    started = time.monotonic()
    url = private_postgres.dsn() + "?connect_timeout=2"
    await apply_migrations(url)
    app = await start_server(url, **FAST_FAIL)
    await wait_for(lambda: _ready_is(health, app, SERVING), 5, "readiness")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        user = (
            await stub.CreateUser(
                user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36),
                metadata=auth,
            )
        ).user

        # Like a crash: every connection drops and nothing more is written.
        await asyncio.to_thread(private_postgres.stop, immediate=True)

        outage_errors: list[grpc.aio.AioRpcError] = []

        async def get_fails() -> bool:
            try:
                await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=5)
            except grpc.aio.AioRpcError as error:
                outage_errors.append(error)
                return True
            return False

        await wait_for(get_fails, 5, "calls to fail while postgres is down")
        await get_fails()  # with the pool's connections gone, too
        for error in outage_errors:
            assert_postgres_unavailable(details, error)
        await wait_for(lambda: _ready_is(health, app, NOT_SERVING), 5, "readiness to drop")
        assert await health(app.port, "") == SERVING

        await asyncio.to_thread(private_postgres.start, timeout=15)

        async def get_works() -> bool:
            try:
                got = await stub.GetUser(
                    user_pb2.GetUserRequest(id=user.id), metadata=auth, timeout=5
                )
            except grpc.aio.AioRpcError as error:
                assert_postgres_unavailable(details, error)
                return False
            assert got.user == user
            return True

        await wait_for(get_works, 10, "calls to succeed once postgres is back")
        await wait_for(lambda: _ready_is(health, app, SERVING), 5, "readiness to return")
    assert time.monotonic() - started < 20


async def _ready_is(health, app, status) -> bool:
    return await health(app.port, SERVICE_NAME) == status
