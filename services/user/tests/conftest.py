"""Fixtures for UserService tests: a private database per test and a real server on a free port."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import Env, GrpcApp
from parley.proto import user_pb2_grpc
from parley.user_service import UserSettings, create_server
from parley.user_service.migrations import apply_migrations

ADMIN_URL = os.environ.get(
    "PARLEY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
JWT_SECRET = "test-secret-" + "s" * 32
DETAILS_KEY = "grpc-status-details-bin"


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


def _create_database() -> str:
    name = f"parley_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class DatabaseFactory:
    """Hands out new, empty databases, creating the next ones and dropping used ones meanwhile.

    CREATE DATABASE costs a few hundred milliseconds of fsync; doing it on worker threads
    while the previous test runs keeps one private database per test affordable. A used
    database is dropped only when the next one is taken, after its test's servers stopped.
    """

    def __init__(self, ahead: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-database")
        self._ahead = ahead
        self._ready: deque[Future[str]] = deque()
        self._used: list[str] = []
        self._drops: list[Future[None]] = []

    def take(self) -> str:
        self._drops += [self._executor.submit(_drop_database, name) for name in self._used]
        self._used.clear()
        while len(self._ready) <= self._ahead:
            self._ready.append(self._executor.submit(_create_database))
        return self._ready.popleft().result()

    def give_back(self, name: str) -> None:
        self._used.append(name)

    def close(self) -> None:
        names = self._used + [f.result() for f in self._ready]
        self._drops += [self._executor.submit(_drop_database, name) for name in names]
        for drop in self._drops:
            drop.result()
        self._executor.shutdown()


@pytest.fixture(scope="session")
def database_factory() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def empty_database(database_factory: DatabaseFactory) -> Iterator[str]:
    """A new, empty database on the shared Postgres, dropped afterwards."""
    name = database_factory.take()
    try:
        yield database_url(name)
    finally:
        database_factory.give_back(name)


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
        # The metrics HTTP server polls for shutdown every 0.5 s; let that wait happen on a
        # thread so the next test can start meanwhile. Everything else stops as usual.
        metrics = getattr(app, "_metrics_server", None)
        if metrics is not None:
            app._metrics_server = None
            _background_stops.append(_stop_metrics_in_background(*metrics))
        await app.stop()


def _stop_metrics_in_background(server: Any, thread: threading.Thread) -> threading.Thread:
    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    stopper = threading.Thread(target=stop, name="metrics-stop", daemon=True)
    stopper.start()
    return stopper


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


@dataclass
class RichError:
    """A failed call's status as the server sent it, rich details decoded."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fields(self) -> list[str]:
        return [f for f, _ in self.violations]


def rich_error(error: grpc.RpcError) -> RichError:
    """Decodes `grpc-status-details-bin` (google.rpc.Status) of a sync or aio call error."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    status = None
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
    found = RichError(code=code, message=message, status=status)
    if status is None:
        return found
    assert status.code == code.value[0], "status details disagree with the call's code"
    assert status.message == message, "status details disagree with the call's message"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason = info.reason
            found.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.violations = [(v.field, v.description) for v in bad.field_violations]
    return found


@pytest.fixture
def details() -> Callable[[grpc.RpcError], RichError]:
    """`details(error)`: the decoded status of a failed call."""
    return rich_error


Condition = Callable[[], Any]


async def wait_until(condition: Condition, timeout: float = 10.0, what: str = "") -> Any:
    """Polls `condition` (sync or async) until it returns a truthy value; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[Any]]:
    """`await wait_for(condition, timeout, what)`: poll a condition, fail on timeout."""
    return wait_until


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening on it (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def unused_port() -> int:
    return free_port()


async def health_status(port: int, service: str) -> int:
    """The grpc.health.v1 status the server on `port` reports for `service`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


@pytest.fixture
def health() -> Callable[[int, str], Awaitable[int]]:
    """`await health(port, service)`: the health status of a service."""
    return health_status


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
