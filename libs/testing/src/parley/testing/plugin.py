"""The fixtures every Parley test suite shares, loaded by pytest itself: parley-testing
registers this module under the `pytest11` entry point, so no conftest imports it.

A conftest may override any of them with a fixture of the same name.

Helpers, handed out by name:

- `unused_port`: a port of 127.0.0.1 with nothing listening on it;
- `wait_for`: `await wait_for(condition, timeout, what)`, polling until it holds;
- `details`: `details(error)`, the decoded status of a failed call;
- `health`: `await health(port, service)`, a grpc.health.v1 status;
- `metrics`: `await metrics(port)`, every sample a metrics port serves;
- `rss`: `rss(pid)`, a process's resident memory in bytes.

Resources of the test's own:

- `jwt_secret` and `token`: `token(sub, scope="", ttl=600, **claims)`, a JWT every service
  the `launcher` starts accepts;
- `database` (both schemas migrated) and `empty_database`: a private database on the shared
  Postgres (PARLEY_TEST_DATABASE_URL), dropped afterwards;
- `redis_url` (the shared Redis, PARLEY_TEST_REDIS_URL), `redis_prefix` (a key prefix no other
  test uses; its keys are deleted afterwards) and `private_redis` (`await private_redis()`, a
  redis-server of the test's own);
- `launcher`: starts services (see parley.testing.launcher), stopped after the test;
- `make_stack`: `await make_stack(replicas=2, people=(...), in_process=False, **chat_env)`, a
  UserService and chat replicas on `database` and `redis_prefix` (parley.testing.stack).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from parley.testing.databases import DatabaseFactory
from parley.testing.errors import RichError, rich_error
from parley.testing.launcher import JWT_SECRET, Launcher
from parley.testing.metrics import scrape_metrics
from parley.testing.network import free_port, health_status
from parley.testing.otlp import OtlpReceiver
from parley.testing.processes import rss_bytes
from parley.testing.redis_server import RedisServer
from parley.testing.schemas import migrate_both_sync
from parley.testing.stack import Stack, start_stack
from parley.testing.tokens import make_token
from parley.testing.waiting import wait_until

SHARED_REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def unused_port() -> int:
    """A port with nothing listening on it."""
    return free_port()


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[Any]]:
    """`await wait_for(condition, timeout, what)`: poll a condition, fail on timeout."""
    return wait_until


@pytest.fixture
def details() -> Callable[[grpc.RpcError], RichError]:
    """`details(error)`: the decoded status of a failed call."""
    return rich_error


@pytest.fixture
def health() -> Callable[[int, str], Awaitable[int]]:
    """`await health(port, service)`: the health status of a service."""
    return health_status


async def _scrape(port: int) -> dict[str, float]:
    return await asyncio.to_thread(scrape_metrics, port)


@pytest.fixture
def metrics() -> Callable[[int], Awaitable[dict[str, float]]]:
    """`await metrics(port)`: the samples served on a metrics port (see sample_key)."""
    return _scrape


@pytest.fixture
def rss() -> Callable[[int], int]:
    """`rss(pid)`: a process's resident memory in bytes."""
    return rss_bytes


# --- Tokens ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    """The HS256 secret of every service the `launcher` starts."""
    return JWT_SECRET


def _token(sub: str, scope: str = "", ttl: float = 600, **claims: Any) -> str:
    return make_token(JWT_SECRET, sub, scope, ttl, **claims)


@pytest.fixture(scope="session")
def token() -> Callable[..., str]:
    """`token(sub, scope="", ttl=600, **claims)`: a JWT signed with `jwt_secret`."""
    return _token


# --- Databases ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_factory() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("parley_test", migrate_both_sync)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def database(database_factory: DatabaseFactory) -> Iterator[str]:
    """The URL of a private database with the user and chat schemas migrated."""
    url = database_factory.take()
    yield url
    database_factory.release(url)


@pytest.fixture
def empty_database(database_factory: DatabaseFactory) -> Iterator[str]:
    """The URL of a private, empty database."""
    url = database_factory.take(prepared=False)
    yield url
    database_factory.release(url)


# --- Redis ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis every test may use under a `redis_prefix` of its own."""
    return SHARED_REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix no other test uses; its keys on the shared Redis go afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    try:
        with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass  # the shared Redis is down: nothing to clean


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RedisServer]]]:
    """`await private_redis(running=True, **options)`: a redis-server of the test's own on a
    free port (not started yet when `running` is false); see RedisServer for the options."""
    servers: list[RedisServer] = []

    async def start(running: bool = True, **options: Any) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, **options)
        servers.append(server)
        if running:
            await server.start()
        return server

    yield start
    await asyncio.gather(*(server.stop() for server in servers))


# --- Services -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _background_stops() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=10)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP trace receiver on a loopback port; `otlp_receiver.env()` points a service
    at it."""
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
async def launcher(
    tmp_path: Path, _background_stops: list[threading.Thread]
) -> AsyncIterator[Launcher]:
    """Starts services for the test; after it, whatever still runs stops (draining)."""
    launcher = Launcher(tmp_path, _background_stops)
    try:
        yield launcher
    finally:
        await launcher.close()


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    database: str, redis_url: str, redis_prefix: str, launcher: Launcher
) -> AsyncIterator[MakeStack]:
    """`await make_stack(replicas=2, people=("Ada", "Grace"), in_process=False, **chat_env)`:
    a UserService and chat replicas on the test's database and Redis prefix. They stop (and
    drain) before the prefix's keys and the database go."""

    async def make(*, redis_url: str = redis_url, **options: Any) -> Stack:
        return await start_stack(launcher, database, redis_url, redis_prefix, **options)

    yield make
    await launcher.close()
