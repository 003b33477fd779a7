"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancels the tasks and returns once every one of them has finished.

    A task is cancelled again until it finishes: on Python 3.11 `asyncio.wait_for`, which
    redis-py and psycopg_pool use inside their calls, returns normally and drops the
    cancellation when it lands just as the awaited operation completes (CPython gh-86296),
    and the task would carry on as if nothing had happened.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so an ended task's error is not reported as lost
