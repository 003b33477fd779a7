"""Fixtures for UserService tests: a private database per test and a real server on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley import testing
from parley.chassis import Env, GrpcApp
from parley.proto import user_pb2_grpc
from parley.testing import (
    DatabaseFactory,
    free_port,
)
from parley.user_service import UserSettings, create_server
from parley.user_service.migrations import apply_migrations

JWT_SECRET = os.urandom(32).hex()


def make_token(sub: str = "1", scope: str = "users:write", ttl: float = 600, **claims: Any) -> str:
    """A token the test servers accept; by default it may read and write."""
    return testing.make_token(JWT_SECRET, sub, scope, ttl, **claims)


@pytest.fixture(scope="session")
def database_factory() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("parley_test", ahead=4)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def empty_database(database_factory: DatabaseFactory) -> str:
    """A new, empty database on the shared Postgres, dropped afterwards."""
    return database_factory.take()


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


@pytest.fixture(scope="session")
def _background_stops() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=10)


@pytest.fixture
async def start_server(_background_stops: list[threading.Thread]) -> AsyncIterator[StartServer]:
    """Factory: start a UserService in this process for a database; stopped after the test."""
    apps: list[GrpcApp] = []

    async def start(database: str, **overrides: str) -> GrpcApp:
        app = create_server(UserSettings.from_env(Env(server_env(database, **overrides))))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        # The metrics HTTP server polls for shutdown every 0.5 s: the next test starts
        # meanwhile. Everything else stops as usual.
        stopping = app.release_metrics_server()
        if stopping is not None:
            _background_stops.append(stopping)
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


# --- Helpers shared by the test modules, handed out as fixtures. ---------------------------


def pool_stats(app: GrpcApp) -> dict[str, float]:
    """The Postgres pool gauges of a running server, read from its metrics registry."""
    names = {
        "size": "parley_db_pool_connections",
        "idle": "parley_db_pool_idle_connections",
        "waiting": "parley_db_pool_waiting_requests",
        "requests": "parley_db_pool_requests_total",
    }
    registry = app.metrics.registry
    return {key: registry.get_sample_value(name) or 0.0 for key, name in names.items()}


@pytest.fixture
def pool() -> Callable[[GrpcApp], dict[str, float]]:
    """`pool(app)`: the server's connection-pool statistics."""
    return pool_stats


@pytest.fixture
async def pg(database: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A direct autocommit connection to the test's database, beside the server's pool."""
    async with await psycopg.AsyncConnection.connect(
        database, autocommit=True, application_name="parley-user-test"
    ) as conn:
        yield conn


async def insert_users(conn: psycopg.AsyncConnection[Any], count: int, prefix: str = "u") -> None:
    """Inserts `count` valid users straight into the table, in one statement."""
    await conn.execute(
        "INSERT INTO users (name, email, age)"
        " SELECT %(p)s || ' ' || g, %(p)s || g || '@example.com', g %% 151"
        " FROM generate_series(1, %(n)s) AS g",
        {"p": prefix, "n": count},
    )


@pytest.fixture
def bulk_insert() -> Callable[..., Awaitable[None]]:
    """`await bulk_insert(conn, count, prefix)`: many valid users at once, through SQL."""
    return insert_users


@pytest.fixture
def token() -> Callable[..., str]:
    """`token(sub=..., scope=..., ttl=..., **claims)`: a signed JWT the test server accepts."""
    return make_token


@dataclass
class ServerProcess:
    """A `parley-user serve` process: its gRPC port and where its log goes."""

    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_until_ready(server: ServerProcess, timeout: float) -> bool:
    """Whether the process reports its service SERVING before `timeout`; False if it exited."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="user.UserService")
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    pytest.fail(f"parley-user serve was not ready after {timeout}s:\n{server.log_text()}")


@pytest.fixture
def start_server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: run `parley-user serve` as a child process on a free port; stopped afterwards."""
    servers: list[ServerProcess] = []

    def start(database: str, **overrides: str) -> ServerProcess:
        for _ in range(3):
            port = free_port()  # another process may take it before the server binds: retry
            env = {**os.environ, **server_env(database, PARLEY_GRPC_PORT=str(port), **overrides)}
            log = tmp_path / f"parley-user-{port}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "parley.user_service.cli", "serve"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            server = ServerProcess(port, log, process)
            servers.append(server)
            if _wait_until_ready(server, timeout=20):
                return server
        pytest.fail(f"parley-user serve did not start:\n{server.log_text()}")

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
