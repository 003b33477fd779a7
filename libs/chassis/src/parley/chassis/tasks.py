"""Starting background tasks apart from the call that needed them, and stopping them."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "detached_task"]

_T = TypeVar("_T")


def detached_task(work: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
    """A task for `work` in a context of its own: a task started by a call outlives it or
    serves others, so it takes neither the call's request id nor its trace span."""
    return asyncio.get_running_loop().create_task(work, name=name, context=contextvars.Context())


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
