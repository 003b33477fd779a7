"""Fixtures for the SDK tests: one real Parley stack (parley.devstack's Stack) for the whole
run, and helpers; tests that kill a chat replica start one of their own (`extra_chat`).

With PARLEY_TEST_CLIENT_TRACING=1 the whole suite runs with a global tracer provider installed,
so that every channel the SDK opens in this process carries the tracing interceptors; after
the run, every span they started must have ended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from parley.client import ChatSession, UserClient
from parley.devstack.services import Service
from parley.devstack.stack import Endpoints, Stack, StackConfig
from parley.proto import chat_pb2, user_pb2
from parley.testing import DatabaseFactory, free_port

# Variables a developer's shell may carry that would change what a client talks to.
_CLIENT_ENV = ("PARLEY_TOKEN", "PARLEY_USER_ADDR", "PARLEY_CHAT_ADDR")
Messages = list[chat_pb2.ChatMessage]

CLIENT_TRACING = os.environ.get("PARLEY_TEST_CLIENT_TRACING", "") == "1"
"""Whether this run has a global tracer provider (see the module's docstring)."""


class _OpenSpans(SpanProcessor):
    """The spans started and not yet ended, by span id."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}
        self.started = 0

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        self.started += 1
        self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None:
            self.open.pop(span.context.span_id, None)


@pytest.fixture(scope="session", autouse=True)
def _client_tracing() -> Iterator[None]:
    if not CLIENT_TRACING:
        yield
        return
    spans = _OpenSpans()
    provider = TracerProvider()
    provider.add_span_processor(spans)
    trace.set_tracer_provider(provider)
    yield
    assert spans.started > 0, "no call was traced"
    assert spans.open == {}, f"spans never ended: {sorted(spans.open.values())}"


@dataclass(frozen=True)
class RunningStack(Endpoints):
    """Where the stack of this run listens, tokens for it, and the `stack` itself."""

    stack: Stack | None = None

    @property
    def admin_token(self) -> str:
        """Subject 1 with users:write (the subject need not exist for UserService calls)."""
        return self.token("1", ("users:write",))


@pytest.fixture(scope="session")
def stack(
    database_factory: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    """A running stack: UserService, two ChatService replicas, a database of its own."""
    environ = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV}
    environ.update(
        PARLEY_DATABASE_URL=database_factory.take(prepared=False),
        PARLEY_REDIS_URL=redis_url,
        PARLEY_LOG_LEVEL="WARNING",
    )
    running = Stack(StackConfig.throwaway(tmp_path_factory.mktemp("stack"), environ))
    try:
        yield RunningStack(**vars(running.start()), stack=running)
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients in tests get their address and token from the test, not from the shell."""
    for variable in _CLIENT_ENV:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def email() -> Callable[[str], str]:
    """`email(prefix)`: an address no other user has."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


class Person(NamedTuple):
    """A user that exists in UserService, with a token for it (no scopes)."""

    user: user_pb2.User
    token: str
    id: int


@pytest.fixture
def person(stack: RunningStack, email: Callable[[str], str]) -> Callable[[str], Person]:
    """`person(name)`: a new user and a chat token whose subject is its id."""

    def make(name: str) -> Person:
        with UserClient(stack.user, token=stack.admin_token) as users:
            user = users.create_user(name=name, email=email(name.lower()), age=30)
        return Person(user, stack.token(str(user.id)), user.id)

    return make


@pytest.fixture
def room() -> str:
    """A room no other test uses."""
    return f"room-{uuid.uuid4().hex[:12]}"


class ExtraReplica(Service):
    """A ChatService replica of the stack that only this test uses, and may kill."""

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        self.process.send(signal.SIGKILL)
        assert self.process.wait(10), "the replica survived SIGKILL"


@pytest.fixture
def extra_chat(stack: RunningStack, tmp_path: Path) -> Iterator[ExtraReplica]:
    """One more `parley-chat serve` as the stack's replicas run, on free ports."""
    assert stack.stack is not None
    replica = stack.stack.services[1]  # the stack's first chat replica
    port, metrics_port = free_port(), free_port()
    spec = replace(replica.spec, title="ChatService (extra)", port=port, metrics_port=metrics_port)
    service = ExtraReplica(spec, replica.environ, log_path=tmp_path / "extra-chat.log")
    try:
        service.wait_serving(30)
        yield service
    finally:
        service.stop(signal.SIGKILL, 10)


@pytest.fixture
def collector() -> Callable[..., Any]:
    """`await collector(session, into, until, timeout=20)`: iterate `session` into `into`
    until `until(into)` holds; fail after `timeout`."""

    async def collect(
        session: ChatSession, into: Messages, until: Callable[[Messages], bool], timeout: float = 20
    ) -> Messages:
        try:
            async with asyncio.timeout(timeout):
                while not until(into):
                    into.append(await anext(session))
        except TimeoutError:
            sequences, texts = [m.sequence for m in into], [m.text for m in into]
            pytest.fail(f"timed out after {timeout}s; got sequences {sequences} texts {texts}")
        except StopAsyncIteration:
            pytest.fail(f"the session ended; got {[m.sequence for m in into]}")
        return into

    return collect
