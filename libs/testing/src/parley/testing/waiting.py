"""Waiting on a condition with a timeout: what tests do instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["wait_until", "wait_until_sync"]

POLL_INTERVAL = 0.02


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Polls `condition` (sync or async) until it returns a truthy value, which it returns;
    fails the test after `timeout` seconds, naming `what` it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(POLL_INTERVAL)


def wait_until_sync(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "",
    detail: Callable[[], object] | None = None,
) -> Any:
    """`wait_until` for tests without an event loop: polls `condition` until it returns a
    truthy value, which it returns; fails after `timeout` seconds, naming `what` it waited
    for and, when given, what `detail()` says then."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            said = f" ({detail()})" if detail is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}{said}")
        time.sleep(POLL_INTERVAL)
