"""Fixtures for UserService tests: a private database per test and a real server on a free port."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import jwt
import psycopg
import pytest

from parley.chassis import Env, GrpcApp
from parley.proto import user_pb2_grpc
from parley.user_service import UserSettings, create_server
from parley.user_service.migrations import apply_migrations

ADMIN_URL = os.environ.get("PARLEY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
JWT_SECRET = "test-secret-" + "s" * 32


def make_token(sub: str = "1", scope: str = "users:write", ttl: float = 600, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iss": "parley", "aud": "parley", "iat": now, "exp": now + ttl}
    if scope:
        payload["scope"] = scope
    payload.update(claims)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def database_url(name: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    params["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **params)


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new, empty database on the shared Postgres, dropped afterwards."""
    name = f"parley_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database(empty_database: str) -> str:
    """A private database with the schema migrated."""
    await apply_migrations(empty_database)
    return empty_database


def server_env(database: str, **overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_DATABASE_URL": database,
        "PARLEY_JWT_SECRET": JWT_SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
        "PARLEY_SHUTDOWN_GRACE": "2",
    }
    env.update(overrides)
    return env


StartServer = Callable[..., Awaitable[GrpcApp]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Factory: start a UserService in this process for a database; stopped after the test."""
    apps: list[GrpcApp] = []

    async def start(database: str, **overrides: str) -> GrpcApp:
        app = create_server(UserSettings.from_env(Env(server_env(database, **overrides))))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def server(start_server: StartServer, database: str) -> GrpcApp:
    return await start_server(database)


@pytest.fixture
async def channel(server: GrpcApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> user_pb2_grpc.UserServiceAsyncStub:
    return user_pb2_grpc.UserServiceStub(channel)  # type: ignore[return-value]


@pytest.fixture
def auth() -> list[tuple[str, str]]:
    """Call metadata with a token that may read and write."""
    return [("authorization", f"Bearer {make_token()}")]


@pytest.fixture
def read_auth() -> list[tuple[str, str]]:
    """Call metadata with a token that has no scopes."""
    return [("authorization", f"Bearer {make_token(sub='2', scope='')}")]
