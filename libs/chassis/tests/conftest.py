"""Fixtures for chassis tests: a tiny UserService on a real port, tokens and metric scrapes.

No database is involved: the servicer below runs whatever behaviour a test installs.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from parley.chassis import (
    AuthSettings,
    DependencyCheck,
    Env,
    GrpcApp,
    ServerSettings,
    TokenVerifier,
    configure_logging,
    current_identity,
)
from parley.proto import user_pb2, user_pb2_grpc

JWT_SECRET = secrets.token_urlsafe(32)  # generated: a literal one would be a published secret
USER_SERVICE = user_pb2.DESCRIPTOR.services_by_name["UserService"]

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


class Servicer(user_pb2_grpc.UserServiceServicer):
    """Each RPC runs the behaviour a test put in the matching attribute.

    By default GetUser answers with the caller's subject as the user's name and its scopes
    as the email, ListUsers streams `page_size` users, ImportUsers counts what it reads.
    `entered` is set whenever any handler starts.
    """

    def __init__(self) -> None:
        self.get_user: Callable[..., Awaitable[Any]] = _whoami
        self.list_users: Callable[..., AsyncIterator[Any]] = _count_up
        self.import_users: Callable[..., Awaitable[Any]] = _tally
        self.delete_user: Callable[..., Awaitable[Any]] = _delete
        self.entered = asyncio.Event()

    async def GetUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.get_user(request, context)

    async def ListUsers(self, request: Any, context: Context) -> AsyncIterator[Any]:
        self.entered.set()
        async for item in self.list_users(request, context):
            yield item

    async def DeleteUser(self, request: Any, context: Context) -> Any:
        self.entered.set()
        return await self.delete_user(request, context)

    async def ImportUsers(self, request_iterator: Any, context: Context) -> Any:
        self.entered.set()
        return await self.import_users(request_iterator, context)


def server_env(**overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.05",
        "PARLEY_SHUTDOWN_GRACE": "1",
        "PARLEY_JWT_SECRET": JWT_SECRET,
    }
    env.update(overrides)
    return env


@dataclass
class Running:
    """A started GrpcApp with a client channel to it."""

    app: GrpcApp
    servicer: Servicer
    channel: grpc.aio.Channel
    stub: Any
    health: health_pb2_grpc.HealthStub
    stopped: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    async def stop(self) -> None:
        self.stopped = True
        await self.app.stop()

    async def health_status(self, service: str = "") -> int:
        response = await self.health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return response.status


Serve = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Factory: start a GrpcApp for the test UserService; stopped after the test.

    Keyword arguments: `checks` (DependencyCheck list), `auth` (AuthSettings, default
    HS256 with JWT_SECRET), `before_start` (called with the app before it
    starts), and PARLEY_* variables to override.
    """
    started: list[Running] = []

    async def start(
        *,
        checks: Sequence[DependencyCheck] = (),
        auth: AuthSettings | None = None,
        before_start: Callable[[GrpcApp], None] | None = None,
        **env: str,
    ) -> Running:
        values = Env(server_env(**env))
        settings = ServerSettings.from_env(values, default_port=0, default_metrics_port=0)
        app = GrpcApp(
            settings,
            services=[USER_SERVICE],
            verifier=TokenVerifier(auth or AuthSettings.from_env(values)),
            checks=checks,
        )
        servicer = Servicer()
        user_pb2_grpc.add_UserServiceServicer_to_server(servicer, app.server)
        if before_start is not None:
            before_start(app)
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        running = Running(
            app=app,
            servicer=servicer,
            channel=channel,
            stub=user_pb2_grpc.UserServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        if not running.stopped:
            await running.app.stop()
        # Also when a test failed while a stop of its own was still under way.
        await running.app.server.stop(0)


@pytest.fixture
async def server(serve: Serve) -> Running:
    return await serve()


def _token(
    *,
    key: Any = JWT_SECRET,
    algorithm: str = "HS256",
    headers: Mapping[str, Any] | None = None,
    ttl: float = 600,
    omit: Sequence[str] = (),
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": "42",
        "iss": "parley",
        "aud": "parley",
        "iat": now,
        "exp": now + ttl,
        "scope": "users:read",
    }
    payload.update(claims)
    for name in omit:
        payload.pop(name, None)
    return jwt.encode(payload, key, algorithm=algorithm, headers=dict(headers or {}))


@pytest.fixture
def jwt_secret() -> str:
    """The HS256 secret that servers from `serve` accept."""
    return JWT_SECRET


@pytest.fixture
def make_token() -> Callable[..., str]:
    """Factory: a signed JWT; claims override the defaults, `omit` drops some."""
    return _token


@pytest.fixture
def auth(make_token: Callable[..., str]) -> list[tuple[str, str]]:
    """Call metadata with a valid HS256 token for subject 42."""
    return [("authorization", f"Bearer {make_token()}")]


class Scrape:
    """One scrape of a /metrics endpoint, parsed with prometheus_client's parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, **labels: str) -> list[Any]:
        """Samples called `name` (a sample name, such as x_total or x_bucket) with the labels."""
        found = []
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    found.append(sample)
        return found

    def value(self, name: str, **labels: str) -> float:
        """The one sample called `name` with exactly these labels (plus `le` if unnamed)."""
        matches = [s for s in self.samples(name, **labels) if set(s.labels) == set(labels)]
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
        return float(matches[0].value)


@pytest.fixture
def scrape() -> Callable[[GrpcApp], Awaitable[Scrape]]:
    """Factory: GET the app's /metrics over HTTP and parse it."""

    async def get(app: GrpcApp) -> Scrape:
        url = f"http://127.0.0.1:{app.metrics_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: bytes = response.read()
                return body.decode()

        return Scrape(await asyncio.to_thread(fetch))

    return get


Eventually = Callable[..., Awaitable[Any]]


@pytest.fixture
def eventually() -> Eventually:
    """Polls an async predicate until it returns something truthy; fails after `timeout` s."""

    async def wait(
        predicate: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, what: str = ""
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await predicate()
            if last:
                return last
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")
            await asyncio.sleep(0.02)

    return wait


@pytest.fixture
def log_to_buffer() -> Iterator[Callable[[str, str], io.StringIO]]:
    """Factory: `configure_logging(fmt, level)` writing to a buffer that it returns.

    The root logger's handlers and level are restored after the test.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(fmt: str, level: str) -> io.StringIO:
        stream = io.StringIO()
        saved_stderr = sys.stderr
        sys.stderr = stream
        try:
            configure_logging(fmt, level)
        finally:
            sys.stderr = saved_stderr
        return stream

    yield configure
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@dataclass
class Probe:
    """A dependency probe whose result the test controls."""

    up: bool = True
    calls: int = 0
    error: str = "connection refused"

    async def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError(self.error)


@pytest.fixture
def probe() -> Probe:
    return Probe()
