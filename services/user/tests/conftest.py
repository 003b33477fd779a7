"""What the UserService tests add to parley.testing's fixtures: a server of the test's own on
its private database, a client of it, call metadata, and SQL beside the server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest

from parley.chassis import GrpcApp
from parley.proto import user_pb2_grpc
from parley.testing.launcher import Launcher, service_env
from parley.testing.metrics import pool_stats
from parley.testing.tokens import bearer

StartServer = Callable[..., Awaitable[GrpcApp]]


@pytest.fixture
def start_server(launcher: Launcher) -> StartServer:
    """`await start_server(database, **PARLEY_*)`: a UserService in this process, just started
    (ready or not), stopped after the test."""

    async def start(database: str, **overrides: str) -> GrpcApp:
        served = await launcher.app("user", service_env(database, **overrides), ready=False)
        assert served.app is not None
        return served.app

    return start


@pytest.fixture
async def server(start_server: StartServer, database: str) -> GrpcApp:
    return await start_server(database)


@pytest.fixture
async def stub(server: GrpcApp) -> AsyncIterator[user_pb2_grpc.UserServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield user_pb2_grpc.UserServiceStub(channel)


@pytest.fixture
def auth(token: Callable[..., str]) -> list[tuple[str, str]]:
    """Call metadata with a token of user 1 that may read and write."""
    return bearer(token("1", "users:write"))


@pytest.fixture
def read_auth(token: Callable[..., str]) -> list[tuple[str, str]]:
    """Call metadata with a token of user 2 that has no scopes."""
    return bearer(token("2"))


@pytest.fixture
def pool() -> Callable[[GrpcApp], dict[str, float]]:
    """`pool(app)`: the server's Postgres pool gauges (see pool_stats)."""
    return lambda app: pool_stats(app.metrics.registry)


@pytest.fixture
async def pg(database: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A direct autocommit connection to the test's database, beside the server's pool."""
    async with await psycopg.AsyncConnection.connect(
        database, autocommit=True, application_name="parley-user-test"
    ) as conn:
        yield conn


@pytest.fixture
def bulk_insert() -> Callable[..., Awaitable[None]]:
    """`await bulk_insert(conn, count, prefix="u")`: many valid users at once, through SQL."""

    async def insert(conn: psycopg.AsyncConnection[Any], count: int, prefix: str = "u") -> None:
        await conn.execute(
            "INSERT INTO users (name, email, age)"
            " SELECT %(p)s || ' ' || g, %(p)s || g || '@example.com', g %% 151"
            " FROM generate_series(1, %(n)s) AS g",
            {"p": prefix, "n": count},
        )

    return insert
