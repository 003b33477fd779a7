"""What the chassis tests add to parley.testing's fixtures: a fake UserService on a real port
(parley.testing.fake_service), tokens for subject 42, metric scrapes, logs to a buffer and a
dependency probe the test controls. No database is involved."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from parley.chassis import GrpcApp, configure_logging
from parley.testing import metrics, tokens
from parley.testing.fake_service import Running, start_fake
from parley.testing.launcher import JWT_SECRET

Serve = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(checks=..., auth=..., before_start=..., **PARLEY_*)`: a fake UserService
    (see start_fake) that accepts `jwt_secret`'s tokens by default; stopped after the test."""
    started: list[Running] = []

    async def start(**options: Any) -> Running:
        started.append(await start_fake(**options))
        return started[-1]

    yield start
    for running in started:
        await running.close()


@pytest.fixture
async def server(serve: Serve) -> Running:
    return await serve()


def _token(
    *,
    key: Any = JWT_SECRET,
    sub: Any = "42",
    scope: str = "users:read",
    ttl: float = 600,
    **kw: Any,
) -> str:
    return tokens.make_token(key, sub, scope, ttl, **kw)


@pytest.fixture
def make_token() -> Callable[..., str]:
    """`make_token(key=jwt_secret, sub="42", scope="users:read", ttl=600, algorithm="HS256",
    headers=None, omit=(), **claims)`: see parley.testing.tokens.make_token."""
    return _token


@pytest.fixture
def auth() -> list[tuple[str, str]]:
    """Call metadata with a valid HS256 token for subject 42."""
    return tokens.bearer(_token())


@pytest.fixture
def scrape() -> Callable[[GrpcApp], Awaitable[metrics.Scrape]]:
    """`await scrape(app)`: the app's /metrics, fetched over HTTP and parsed."""
    return lambda app: metrics.scrape(app.metrics_port)


@pytest.fixture
def log_to_buffer() -> Iterator[Callable[[str, str], io.StringIO]]:
    """`log_to_buffer(fmt, level)`: configure_logging writing to the buffer it returns; the
    root logger's handlers and level are restored after the test."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(fmt: str, level: str) -> io.StringIO:
        stream = io.StringIO()
        saved_stderr, sys.stderr = sys.stderr, stream
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
