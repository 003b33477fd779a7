"""Fixtures for the SDK tests: one real Parley stack for the whole run, and helpers.

The stack is `parley.devstack.stack.Stack` (UserService and two ChatService replicas as child
processes) on free ports, against a fresh database created on the machine's Postgres
(PARLEY_TEST_DATABASE_URL, default postgres@127.0.0.1:5432) and the machine's Redis
(PARLEY_TEST_REDIS_URL) under a Redis key prefix of its own. The database is dropped at the
end. Tests that kill a chat replica start an extra one of their own (`extra_chat`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from parley.client import ChatSession, UserClient
from parley.devstack.ports import free_ports
from parley.devstack.services import Service, ServiceSpec
from parley.devstack.stack import Endpoints, Stack, StackConfig
from parley.proto import chat_pb2, user_pb2
from parley.testing import DatabaseFactory, wait_until

REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WRITE = ("users:write",)

# Variables a developer's shell may carry that would change what a client talks to.
_CLIENT_ENV = ("PARLEY_TOKEN", "PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR")


@dataclass
class RunningStack:
    """The stack of this test run."""

    stack: Stack
    endpoints: Endpoints
    environ: dict[str, str]

    @property
    def user(self) -> str:
        return self.endpoints.user

    @property
    def chat(self) -> str:
        return self.endpoints.chat

    @property
    def chat2(self) -> str:
        return self.endpoints.chat2

    def token(self, subject: str, scopes: tuple[str, ...] = ()) -> str:
        return self.endpoints.token(subject, scopes)

    @property
    def admin_token(self) -> str:
        """Subject 1 with users:write (the subject need not exist for UserService calls)."""
        return self.token("1", WRITE)

    def chat_env(self) -> dict[str, str]:
        """The environment a chat replica of this stack runs with."""
        endpoints = self.endpoints
        env = dict(self.environ)
        env.update(
            PARLEY_DATABASE_URL=endpoints.database_url,
            PARLEY_REDIS_URL=endpoints.redis_url,
            PARLEY_JWT_SECRET=endpoints.jwt_secret,
            PARLEY_REDIS_PREFIX=endpoints.redis_prefix or "",
            PARLEY_USER_SERVICE_ADDR=f"dns:///{endpoints.user}",
            PARLEY_GRPC_HOST="127.0.0.1",
            PARLEY_METRICS_HOST="127.0.0.1",
        )
        return env


@pytest.fixture(scope="session")
def stack() -> Iterator[RunningStack]:
    """A running stack: UserService, two ChatService replicas, a database of its own."""
    databases = DatabaseFactory("parley_client_test", ahead=0)
    database = databases.take(prepared=False)
    data_dir = Path(tempfile.mkdtemp(prefix="parley-client-test-"))
    environ = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV}
    environ.update(
        PARLEY_DATABASE_URL=database,
        PARLEY_REDIS_URL=REDIS_URL,
        PARLEY_LOG_LEVEL="WARNING",
    )
    running = Stack(StackConfig.throwaway(data_dir, environ))
    try:
        endpoints = running.start()
        yield RunningStack(running, endpoints, environ)
    finally:
        running.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        databases.close()


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients in tests get their address and token from the test, not from the shell."""
    for variable in _CLIENT_ENV:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on."""
    return free_ports(1)[0]


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


@pytest.fixture
def email() -> Callable[[str], str]:
    """`email(prefix)`: an address no other user has."""
    return unique_email


@dataclass(frozen=True)
class Person:
    """A user that exists in UserService, with a token for it (no scopes)."""

    user: user_pb2.User
    token: str

    @property
    def id(self) -> int:
        return self.user.id


@pytest.fixture
def person(stack: RunningStack) -> Callable[[str], Person]:
    """`person(name)`: a new user and a chat token whose subject is its id."""

    def make(name: str) -> Person:
        with UserClient(stack.user, token=stack.admin_token) as users:
            user = users.create_user(name=name, email=unique_email(name.lower()), age=30)
        return Person(user, stack.token(str(user.id)))

    return make


@pytest.fixture
def room() -> str:
    """A room no other test uses."""
    return f"room-{uuid.uuid4().hex[:12]}"


@dataclass
class ExtraReplica:
    """A ChatService replica of the stack that only this test uses, and may kill."""

    service: Service

    @property
    def address(self) -> str:
        return self.service.spec.address

    @property
    def port(self) -> int:
        return self.service.spec.port

    def signal(self, signum: signal.Signals) -> None:
        self.service.process.send(signum)

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        self.signal(signal.SIGKILL)
        assert self.service.process.wait(10), "the replica survived SIGKILL"


@pytest.fixture
def extra_chat(stack: RunningStack) -> Iterator[ExtraReplica]:
    """An extra `parley-chat serve` against the stack's database and Redis."""
    port, metrics_port = free_ports(2)
    spec = ServiceSpec("ChatService (extra)", "parley-chat", "chat.ChatService", port, metrics_port)
    service = Service(spec, stack.chat_env())
    try:
        service.wait_serving(30)
        yield ExtraReplica(service)
    finally:
        service.process.stop(signal.SIGKILL, 10)


async def collect(
    session: ChatSession,
    into: list[chat_pb2.ChatMessage],
    until: Callable[[list[chat_pb2.ChatMessage]], bool],
    timeout: float = 20.0,
) -> list[chat_pb2.ChatMessage]:
    """Iterate `session` into `into` until `until(into)` holds; fail after `timeout`."""
    if until(into):
        return into
    try:
        async with asyncio.timeout(timeout):
            async for message in session:
                into.append(message)
                if until(into):
                    return into
    except TimeoutError:
        pytest.fail(
            f"timed out after {timeout}s; got sequences {[m.sequence for m in into]} "
            f"texts {[m.text for m in into]}"
        )
    pytest.fail(f"the session ended; got {[m.sequence for m in into]}")


@pytest.fixture
def collector() -> Callable[..., Any]:
    """`await collector(session, into, until, timeout=20)`: see `collect`."""
    return collect


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return wait_until
