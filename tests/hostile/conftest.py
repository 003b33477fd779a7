"""Fixtures for the hostile-input tests: one UserService and one ChatService, real
`parley-<kind> serve` processes started by parley.testing's launcher, on a private Postgres
database and a private Redis key prefix, shared by the whole session (the tests only add data
of their own); `serve` starts more servers for one test.

They run with PARLEY_MAX_MESSAGE_BYTES=65536 so that the size limit is the configured one,
not gRPC's built-in 4 MiB.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from parley.testing import DatabaseFactory, make_token
from parley.testing.launcher import JWT_SECRET, Launcher, Served
from parley.testing.schemas import migrate_both_sync

from .servers import Stack, server_env


@pytest.fixture(scope="session")
def stack(redis_url: str) -> Iterator[Stack]:
    factory = DatabaseFactory("parley_hostile_test", migrate_both_sync, ahead=0)
    launcher = Launcher(Path(tempfile.mkdtemp(prefix="parley-hostile-")))
    stack: Stack | None = None
    try:
        database = factory.take()
        user = launcher.process_sync("user", server_env("user", database))
        chat = launcher.process_sync("chat", server_env("chat", database, redis_url, user.target))
        stack = Stack(database, user, chat, make_token(JWT_SECRET, "admin", "users:write"))
        chatter = stack.create_user("Hostile Chatter")
        stack.chatter_id, stack.chatter_name = chatter.id, chatter.name
        stack.chatter_token = make_token(JWT_SECRET, str(chatter.id))
        yield stack
    finally:
        for channel in stack.channels.values() if stack is not None else ():
            channel.close()
        launcher.close_sync()
        factory.close()


@pytest.fixture
def serve(stack: Stack, launcher: Launcher, redis_url: str) -> Callable[..., Served]:
    """`serve(kind, **settings)`: one more `parley-<kind> serve` on the stack's database (and,
    for chat, a Redis prefix of its own) with the given PARLEY_* settings, for this test."""

    def start(kind: str, **settings: str) -> Served:
        env = server_env(kind, stack.database, redis_url, stack.user.target, **settings)
        return launcher.process_sync(kind, env)

    return start
