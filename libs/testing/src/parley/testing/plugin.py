"""The fixtures every Parley test suite shares, loaded by pytest itself: parley-testing
registers this module under the `pytest11` entry point, so no conftest imports it.

Each fixture hands out one of parley.testing's helpers, so that tests ask for it by name:

- `unused_port`: a port of 127.0.0.1 with nothing listening on it;
- `wait_for`: `await wait_for(condition, timeout, what)`, polling until it holds;
- `details`: `details(error)`, the decoded status of a failed call;
- `health`: `await health(port, service)`, a grpc.health.v1 status;
- `metrics`: `await metrics(port)`, every sample a metrics port serves;
- `rss`: `rss(pid)`, a process's resident memory in bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from parley.testing.errors import RichError, rich_error
from parley.testing.metrics import scrape_metrics
from parley.testing.network import free_port, health_status
from parley.testing.processes import rss_bytes
from parley.testing.waiting import wait_until


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
