"""Fixtures of the ChatService tests alone: chat clients (parley.testing.chat_client) and the
checks made with them. Databases, Redis, tokens, the launcher and whole stacks come from the
parley.testing plugin.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from parley.proto.contract import CHAT_SERVICE
from parley.testing import health_status, wait_until
from parley.testing.chat_client import (
    Channels,
    Chat,
    ChatClient,
    check_clients,
    expected_counts,
    presence,
    wait_for_streams,
)
from parley.testing.launcher import Launcher, Served
from parley.testing.stack import Person, StoredMessage, stored_messages
from parley.testing.tokens import make_token


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    pool = Channels()
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def chat(channels: Channels) -> AsyncIterator[Chat]:
    """`await chat(person, service, room=..., resume_after=...)`: a connected ChatClient."""
    maker = Chat(channels)
    try:
        yield maker
    finally:
        await maker.close()


@pytest.fixture
def launcher(chat: Chat, launcher: Launcher) -> Launcher:
    """The plugin's launcher, set up after `chat`: after the test the servers stop first
    (draining the streams still open, as in production) and only then do the clients close."""
    return launcher


@pytest.fixture
def stored() -> Callable[[str, str], Awaitable[list[StoredMessage]]]:
    """`await stored(database_url, room)`: a room's rows in chat_messages, by sequence."""
    return stored_messages


@pytest.fixture
def conversation_intact() -> Callable[[Sequence[ChatClient], Sequence[StoredMessage]], None]:
    """`conversation_intact(clients, rows)`: asserts zero lost, zero duplicated, in order."""
    return check_clients


@pytest.fixture
def stranger(jwt_secret: str) -> Callable[[str], Person]:
    """`stranger(subject)`: a Person with a valid token for `subject`, unknown to UserService."""

    def make(subject: str) -> Person:
        user_id = int(subject) if subject.isdigit() else 0
        return Person(user_id, subject, make_token(jwt_secret, subject))

    return make


@pytest.fixture
def list_presence(channels: Channels) -> Callable[..., Awaitable[dict[int, tuple[str, int]]]]:
    """`await list_presence(service, person, room)`: {user_id: (name, stream_count)}."""

    async def call(service: Served, person: Person, room: str) -> dict[int, tuple[str, int]]:
        return await presence(channels, service, person, room)

    return call


@pytest.fixture
def streams_joined(channels: Channels) -> Callable[..., Awaitable[None]]:
    """`await streams_joined(service, person, room, {user_id: count}, timeout=15)`: waits until
    presence lists exactly those streams (see wait_for_streams)."""

    async def call(
        service: Served, person: Person, room: str, expected: dict[int, int], timeout: float = 15
    ) -> None:
        await wait_for_streams(channels, service, person, room, expected, timeout)

    return call


@pytest.fixture
def stream_counts() -> Callable[[Sequence[ChatClient]], dict[int, int]]:
    """`stream_counts(clients)`: {user_id: number of clients}, as presence should list them."""
    return expected_counts


@pytest.fixture
def redis_not_ready(
    make_stack: Callable[..., Awaitable[Any]], launcher: Launcher
) -> Callable[..., Awaitable[tuple[str, str, str]]]:
    """`await redis_not_ready(**env)`: starts a chat replica with `env`, waits until it
    reports Redis not ready and is NOT_SERVING, stops it. Returns its readiness line about
    Redis, its log and its metrics."""

    async def start(**env: str) -> tuple[str, str, str]:
        stack = await make_stack(replicas=0, people=())
        replica = await launcher.process("chat", stack.chat_env(**env), ready=False)

        def reported() -> bool:
            text = replica.log_text()
            assert replica.alive(), text
            return "not ready: redis: " in text

        await wait_until(reported, 30, "the replica to report Redis not ready")
        status = await health_status(replica.port, CHAT_SERVICE)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        metrics_text = await asyncio.to_thread(_metrics_text, replica.metrics_port)
        await launcher.stop(replica)
        text = replica.log_text()
        line = next(line for line in text.splitlines() if "not ready: redis: " in line)
        return line, text, metrics_text

    return start


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())
