"""Fixtures for the hostile-input tests: one UserService and one ChatService, each a real
`parley-<kind> serve` process on its own port, on a private Postgres database and a private
Redis key prefix, shared by the whole session (the tests only add data of their own).

Both run with PARLEY_MAX_MESSAGE_BYTES=65536 so that the size limit is the configured one,
not gRPC's built-in 4 MiB.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley import testing
from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.testing import DatabaseFactory, bearer, free_port
from parley.testing.schemas import migrate_both_sync

JWT_SECRET = os.urandom(32).hex()
MAX_MESSAGE_BYTES = 65536
REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent
SERVING = health_pb2.HealthCheckResponse.SERVING


def make_token(sub: str, scope: str = "", ttl: float = 600, **claims: Any) -> str:
    """An HS256 JWT the hostile-test servers accept (unless the claims say otherwise)."""
    return testing.make_token(JWT_SECRET, sub, scope, ttl, **claims)


def common_env(database: str) -> dict[str, str]:
    """The settings every hostile-test server runs with, on `database`."""
    return {
        "PARLEY_DATABASE_URL": database,
        "PARLEY_JWT_SECRET": JWT_SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
        "PARLEY_SHUTDOWN_GRACE": "2",
        "PARLEY_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        # Every test streams in rooms of its own, most as the one chat user, and each such
        # room counts as one that user made.
        "PARLEY_CHAT_MAX_ROOMS_PER_USER": "100000",
    }


@dataclass
class Server:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _serve(kind: str, env: dict[str, str], directory: Path) -> Server:
    port = free_port()
    log = directory / f"parley-{kind}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / f"parley-{kind}"), "serve"],
            env={**os.environ, **env, "PARLEY_GRPC_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(kind, port, process, log)
    # Watch streams the status until it is SERVING: no polling, and wait_for_ready rides out
    # the time before the port listens.
    service = "chat.ChatService" if kind == "chat" else "user.UserService"
    with grpc.insecure_channel(server.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            for reply in stub.Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=30, wait_for_ready=True
            ):
                if reply.status == SERVING:
                    break
        except grpc.RpcError as error:
            _stop(server)
            pytest.fail(f"parley-{kind} did not become SERVING: {error}\n{server.log_text()}")
    return server


def _stop(server: Server) -> None:
    if server.alive():
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@dataclass
class Stack:
    """The running servers, their database, and a chat user with a token."""

    database: str
    user: Server
    chat: Server
    writer_token: str  # users:write, subject not a user
    chatter_id: int
    chatter_name: str
    chatter_token: str  # subject: chatter_id
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, target: str) -> grpc.Channel:
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(target)
        return self.channels[target]

    def users(self) -> Any:
        return user_pb2_grpc.UserServiceStub(self.channel(self.user.target))

    def chats(self) -> Any:
        return chat_pb2_grpc.ChatServiceStub(self.channel(self.chat.target))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def create_user(self, name: str, email: str | None = None) -> user_pb2.User:
        email = email or f"{uuid.uuid4().hex[:12]}@example.com"
        reply = self.users().CreateUser(
            user_pb2.CreateUserRequest(name=name, email=email, age=30),
            metadata=bearer(self.writer_token),
            timeout=10,
        )
        return reply.user

    def stream_chat(
        self,
        messages: list[chat_pb2.ChatMessage],
        *,
        expect: int,
        token: str | None = None,
        metadata: list[tuple[str, str]] | None = None,
        settled: Callable[[], bool] | None = None,
        timeout: float = 10,
    ) -> tuple[list[chat_pb2.ChatMessage], grpc.StatusCode | None]:
        """Sends `messages` on one StreamChat call and reads until `expect` messages came or
        the call ended; returns what came and the status code it ended with (None: still
        open, then cancelled by us). The server keeps a stream open after the client's
        half-close, so reaching `expect` is the normal end."""
        call_metadata = list(metadata or [])
        if token is not None:
            call_metadata += bearer(token)
        call = self.chats().StreamChat(iter(messages), metadata=call_metadata, timeout=timeout)
        received: list[chat_pb2.ChatMessage] = []
        try:
            if expect > 0:
                for message in call:
                    received.append(message)
                    if len(received) >= expect:
                        break
            elif settled is not None:
                # Nothing is to arrive: wait (polling, with a deadline) for the effect instead.
                deadline = time.monotonic() + timeout
                while not settled():
                    assert time.monotonic() < deadline, "the stream's effect never showed"
                    time.sleep(0.02)
            else:
                # Nothing may arrive; only the end of the call can say so.
                for message in call:
                    received.append(message)
        except grpc.RpcError as error:
            return received, error.code()
        call.cancel()
        return received, None

    def assert_serving(self) -> None:
        assert self.user.alive(), self.user.log_text()
        assert self.chat.alive(), self.chat.log_text()
        user = self.users().GetUser(
            user_pb2.GetUserRequest(id=self.chatter_id),
            metadata=bearer(self.chatter_token),
            timeout=10,
        )
        assert user.user.name == self.chatter_name


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    factory = DatabaseFactory("parley_hostile_test", migrate_both_sync, ahead=0)
    directory = Path(tempfile.mkdtemp(prefix="parley-hostile-"))
    servers: list[Server] = []
    stack: Stack | None = None
    try:
        database = factory.take()
        common = common_env(database)
        user = _serve("user", common, directory)
        servers.append(user)
        chat = _serve(
            "chat",
            {
                **common,
                "PARLEY_REDIS_URL": REDIS_URL,
                "PARLEY_REDIS_PREFIX": f"hostile-{uuid.uuid4().hex[:12]}",
                "PARLEY_USER_SERVICE_ADDR": user.target,
                "PARLEY_CHAT_RATE_LIMIT": "100000",
                "PARLEY_CHAT_RATE_BURST": "100000",
            },
            directory,
        )
        servers.append(chat)
        stack = Stack(database, user, chat, make_token("admin", "users:write"), 0, "", "")
        chatter = stack.create_user("Hostile Chatter")
        stack.chatter_id = chatter.id
        stack.chatter_name = chatter.name
        stack.chatter_token = make_token(str(chatter.id))
        yield stack
    finally:
        if stack is not None:
            for channel in stack.channels.values():
                channel.close()
        for server in reversed(servers):
            _stop(server)
        factory.close()


@pytest.fixture
def serve(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """`serve(kind, **settings)`: one more `parley-<kind> serve` on the stack's database (and,
    for chat, a Redis prefix of its own) with the given PARLEY_* settings, stopped after the
    test. `metrics_port` of the returned server is where its /metrics listens."""
    started: list[Server] = []

    def start(kind: str, **settings: str) -> Server:
        env = common_env(stack.database)
        env["PARLEY_METRICS_PORT"] = str(free_port())
        if kind == "chat":
            env.update(
                PARLEY_REDIS_URL=REDIS_URL,
                PARLEY_REDIS_PREFIX=f"hostile-{uuid.uuid4().hex[:12]}",
                PARLEY_USER_SERVICE_ADDR=stack.user.target,
            )
        env.update(settings)
        server = _serve(kind, env, tmp_path)
        server.metrics_port = int(env["PARLEY_METRICS_PORT"])
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            _stop(server)


@pytest.fixture(scope="session")
def token() -> Callable[..., str]:
    """`token(sub, scope="", ttl=600, **claims)`: a JWT signed with the servers' secret."""
    return make_token
