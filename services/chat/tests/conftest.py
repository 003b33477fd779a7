"""Fixtures for ChatService tests: private databases, real servers, real Redis, chat clients.

Every test gets a migrated database of its own and a Redis key prefix of its own. Servers run
either in this process (`GrpcApp`s on free ports) or as `parley-user serve` / `parley-chat
serve` child processes, which tests can kill. Helpers are handed out as fixtures.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from grpc_health.v1 import health_pb2

from parley import testing
from parley.chassis import Env, GrpcApp
from parley.chat_service import ChatSettings
from parley.chat_service import create_server as create_chat_server
from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import RESUME_KEY, ROOM_KEY
from parley.testing import (
    DatabaseFactory,
    RedisServer,
    bearer,
    free_port,
    health_status,
    wait_until,
)
from parley.testing.schemas import migrate_both_sync
from parley.user_service import UserSettings
from parley.user_service import create_server as create_user_server

SHARED_REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
JWT_SECRET = os.urandom(32).hex()
BIN = Path(sys.executable).parent
CHAT_SERVICE = "chat.ChatService"
USER_SERVICE = "user.UserService"
USER_DEPENDENCY = "dependency/user-service"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- Small helpers --------------------------------------------------------------------------


def make_token(sub: str, scope: str = "", ttl: float = 600, **claims: Any) -> str:
    """An HS256 JWT the test servers accept."""
    return testing.make_token(JWT_SECRET, sub, scope, ttl, **claims)


@pytest.fixture
def token() -> Callable[..., str]:
    """`token(sub, scope="", ttl=600, **claims)`: a signed JWT."""
    return make_token


# --- Databases ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_factory() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("parley_chat_test", migrate_both_sync)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def database(database_factory: DatabaseFactory) -> str:
    """The URL of a private database with the user and chat schemas migrated."""
    return database_factory.take()


@pytest.fixture
def unmigrated_database(database_factory: DatabaseFactory) -> str:
    """The URL of a private, empty database."""
    return database_factory.take(prepared=False)


@dataclass(frozen=True)
class StoredMessage:
    sequence: int
    user_id: int
    user_name: str
    text: str
    client_message_id: str


async def stored_messages(url: str, room: str) -> list[StoredMessage]:
    """A room's messages as Postgres holds them, by sequence."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT sequence, user_id, user_name, text, client_message_id FROM chat_messages"
            " WHERE room = %s ORDER BY sequence",
            (room,),
        )
        return [StoredMessage(*row) for row in await cur.fetchall()]


@pytest.fixture
def stored() -> Callable[[str, str], Awaitable[list[StoredMessage]]]:
    """`await stored(database_url, room)`: a room's rows in chat_messages, by sequence."""
    return stored_messages


# --- Private Redis servers ------------------------------------------------------------------


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RedisServer]]]:
    """Factory: `await private_redis(running=True)`, a redis-server of the test's own on a free
    port (not started yet when `running` is false)."""
    servers: list[RedisServer] = []

    async def start(running: bool = True) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory)
        servers.append(server)
        if running:
            await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


# --- Servers --------------------------------------------------------------------------------


@dataclass
class Service:
    """A running UserService or ChatService, in this process or as a child process."""

    kind: str  # "user" or "chat"
    port: int
    metrics_port: int
    app: GrpcApp | None = None
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "an in-process server has no pid of its own"
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    @property
    def health_name(self) -> str:
        return CHAT_SERVICE if self.kind == "chat" else USER_SERVICE


def base_env(database: str, **overrides: str) -> dict[str, str]:
    env = {
        "PARLEY_DATABASE_URL": database,
        "PARLEY_JWT_SECRET": JWT_SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
        "PARLEY_SHUTDOWN_GRACE": "3",
        "PARLEY_LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return env


def chat_env(
    database: str, redis_url: str, prefix: str, user_service: str, **overrides: str
) -> dict[str, str]:
    env = base_env(
        database,
        PARLEY_REDIS_URL=redis_url,
        PARLEY_REDIS_PREFIX=prefix,
        PARLEY_USER_SERVICE_ADDR=user_service,
        PARLEY_CHAT_RATE_LIMIT="100000",
        PARLEY_CHAT_RATE_BURST="100000",
        PARLEY_CHAT_RESYNC_INTERVAL="0.5",
    )
    env.update(overrides)
    return env


@pytest.fixture
def server_env() -> Callable[..., dict[str, str]]:
    """`server_env(database, **overrides)`: PARLEY_* variables of a test UserService; add
    PARLEY_REDIS_URL and the like for a ChatService."""
    return base_env


_SERVING_LINE = re.compile(r"serving gRPC on \S+:(\d+), metrics on \S+:(\d+)")


def _stop_metrics_in_background(app: GrpcApp, threads: list[threading.Thread]) -> None:
    # The metrics HTTP server polls for shutdown every 0.5 s; wait for it on a thread.
    stopping = app.release_metrics_server()
    if stopping is not None:
        threads.append(stopping)


@pytest.fixture(scope="session")
def _background_stops() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=10)


class Launcher:
    """Starts servers for one test and stops whatever is still running afterwards."""

    def __init__(self, tmp_path: Path, background: list[threading.Thread]) -> None:
        self._tmp_path = tmp_path
        self._background = background
        self.services: list[Service] = []
        self._names = itertools.count(1)

    async def start_app(self, kind: str, env: dict[str, str], *, ready: bool = True) -> Service:
        """A server in this process; `ready` waits until its service reports SERVING."""
        if kind == "chat":
            app = create_chat_server(ChatSettings.from_env(Env(env)))
        else:
            app = create_user_server(UserSettings.from_env(Env(env)))
        await app.start()
        service = Service(kind, app.port, app.metrics_port, app=app)
        self.services.append(service)
        if ready:
            await self.wait_ready(service)
        return service

    async def start_process(self, kind: str, env: dict[str, str]) -> Service:
        """`parley-<kind> serve` as a child process on free ports, once it reports SERVING."""
        log = self._tmp_path / f"parley-{kind}-{next(self._names)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(BIN / f"parley-{kind}"), "serve"],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(kind, 0, 0, process=process, log=log)
        self.services.append(service)

        def ports() -> bool:
            if process.poll() is not None:
                pytest.fail(f"parley-{kind} serve exited early:\n{service.log_text()}")
            match = _SERVING_LINE.search(service.log_text())
            if match:
                service.port, service.metrics_port = int(match[1]), int(match[2])
            return match is not None

        await wait_until(ports, 30, f"parley-{kind} serve to listen")
        await self.wait_ready(service)
        return service

    async def wait_ready(
        self, service: Service, timeout: float = 20, *, name: str | None = None
    ) -> None:
        """Waits until `service` reports its service (or the health name `name`) SERVING."""
        name = name or service.health_name

        async def serving() -> bool:
            try:
                return await health_status(service.port, name) == SERVING
            except grpc.aio.AioRpcError:
                return False

        await wait_until(serving, timeout, f"{name} on port {service.port} to be SERVING")

    async def stop(self, service: Service) -> None:
        """Stops a server as in production: drain on SIGTERM (or `GrpcApp.stop()`)."""
        if service.app is not None:
            app, service.app = service.app, None
            _stop_metrics_in_background(app, self._background)
            await app.stop()
        if service.process is not None and service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(service.process.wait, 15)
            except subprocess.TimeoutExpired:
                service.process.kill()
                await asyncio.to_thread(service.process.wait)

    async def close(self) -> None:
        for service in self.services:
            if service.process is not None and service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self.stop(service) for service in reversed(self.services)))


@pytest.fixture
async def launcher(
    tmp_path: Path, _background_stops: list[threading.Thread], chat: Chat
) -> AsyncIterator[Launcher]:
    """Starts servers for the test; after it, they stop first (draining the streams still
    open, as in production) and only then are the clients closed."""
    launcher = Launcher(tmp_path, _background_stops)
    try:
        yield launcher
    finally:
        await launcher.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix no other test uses; its keys on the shared Redis go afterwards."""
    prefix = f"chat-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    try:
        client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5)
        with client:
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass  # the shared Redis is down: nothing to clean


@dataclass(frozen=True)
class Person:
    """A user in UserService and a token for them."""

    id: int
    name: str
    token: str


@dataclass
class Stack:
    """A UserService and chat replicas sharing one private database and Redis prefix."""

    launcher: Launcher
    database: str
    redis_url: str
    prefix: str
    users: Service
    replicas: list[Service]
    people: dict[str, Person]
    in_process: bool
    chat_overrides: dict[str, str]

    def chat_env(self, **overrides: str) -> dict[str, str]:
        return chat_env(
            self.database,
            self.redis_url,
            self.prefix,
            self.users.target,
            **{**self.chat_overrides, **overrides},
        )

    async def add_replica(self, **overrides: str) -> Service:
        env = self.chat_env(**overrides)
        if self.in_process:
            replica = await self.launcher.start_app("chat", env)
        else:
            replica = await self.launcher.start_process("chat", env)
        self.replicas.append(replica)
        return replica

    async def add_person(self, name: str) -> Person:
        person = (await create_people(self.users.target, [name]))[name]
        self.people[name] = person
        return person


async def create_people(target: str, names: Sequence[str]) -> dict[str, Person]:
    """Creates users in UserService (with a users:write token) and a chat token for each."""
    admin = bearer(make_token("admin", scope="users:write"))
    people: dict[str, Person] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for name in names:
            email = f"{name.lower().replace(' ', '.')}.{uuid.uuid4().hex[:6]}@example.com"
            reply = await stub.CreateUser(
                user_pb2.CreateUserRequest(name=name, email=email, age=36),
                metadata=admin,
                timeout=10,
            )
            user = reply.user
            people[name] = Person(user.id, user.name, make_token(str(user.id)))
    return people


@pytest.fixture
def stranger() -> Callable[[str], Person]:
    """`stranger(subject)`: a Person with a valid token for `subject`, unknown to UserService."""

    def make(subject: str) -> Person:
        user_id = int(subject) if subject.isdigit() else 0
        return Person(user_id, subject, make_token(subject))

    return make


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
def make_stack(launcher: Launcher, database: str, redis_prefix: str) -> MakeStack:
    """Factory: `await make_stack(replicas=2, people=(...), in_process=False, redis_url=None,
    **chat_env)` starts a UserService and chat replicas, and creates the people."""

    async def make(
        *,
        replicas: int = 2,
        people: Sequence[str] = ("Ada", "Grace"),
        in_process: bool = False,
        redis_url: str | None = None,
        **overrides: str,
    ) -> Stack:
        user_env = base_env(database)
        start = launcher.start_app if in_process else launcher.start_process
        stack = Stack(
            launcher=launcher,
            database=database,
            redis_url=redis_url or SHARED_REDIS_URL,
            prefix=redis_prefix,
            users=Service("user", 0, 0),
            replicas=[],
            people={},
            in_process=in_process,
            chat_overrides=overrides,
        )
        if in_process:
            stack.users = await start("user", user_env)
            stack.replicas = [await start("chat", stack.chat_env()) for _ in range(replicas)]
        else:
            # The chat replicas do not need UserService to be ready: start everything at once.
            user_port = free_port()
            stack.users.port = user_port
            started = await asyncio.gather(
                start("user", base_env(database, PARLEY_GRPC_PORT=str(user_port))),
                *(start("chat", stack.chat_env()) for _ in range(replicas)),
            )
            stack.users, stack.replicas = started[0], list(started[1:])
        for replica in stack.replicas:
            # A replica that probed UserService before it listened retries after a backoff.
            await launcher.wait_ready(replica, name=USER_DEPENDENCY)
        stack.people = await create_people(stack.users.target, people)
        return stack

    return make


# --- Chat clients ---------------------------------------------------------------------------


class Channels:
    """Client channels by target (and optional key), closed after the test."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, Any], grpc.aio.Channel] = {}

    def get(
        self, target: str, key: Any = None, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        if (target, key) not in self._channels:
            self._channels[(target, key)] = grpc.aio.insecure_channel(target, options=options)
        return self._channels[(target, key)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        self._channels.clear()


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    pool = Channels()
    try:
        yield pool
    finally:
        await pool.close()


WRITE_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


class ChatClient:
    """One chat user in one room: a StreamChat call at a time, everything it received across
    reconnects, and an outbox of messages with client ids for resending until acknowledged."""

    _ids = itertools.count(1)

    def __init__(self, channels: Channels, person: Person, room: str | None) -> None:
        self.person = person
        self.room = room
        self.name = f"{person.name}#{next(self._ids)}"
        self._channels = channels
        self.received: list[chat_pb2.ChatMessage] = []
        self.outbox: dict[str, str] = {}
        self.call: Any = None
        self.service: Service | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = True
        self.connections = 0
        self._reader: asyncio.Task[None] | None = None

    def metadata(self, resume_after: int | str | None) -> list[tuple[str, str]]:
        metadata = bearer(self.person.token)
        if self.room is not None:
            metadata.append((ROOM_KEY, self.room))
        if resume_after is not None:
            metadata.append((RESUME_KEY, str(resume_after)))
        return metadata

    async def connect(
        self,
        service: Service,
        *,
        resume_after: int | str | None = None,
        channel_key: Any = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        read: bool = True,
    ) -> ChatClient:
        """Opens a stream on `service` (the previous one must have ended); with `read` false
        nothing is read from it until `start_reading()`."""
        assert self.ended, f"{self.name} is still connected"
        channel = self._channels.get(service.target, channel_key, channel_options)
        self.service = service
        self.error = None
        self.ended = False
        self.connections += 1
        self.call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(
            metadata=self.metadata(resume_after)
        )
        self._reader = None
        if read:
            self.start_reading()
        return self

    def start_reading(self) -> None:
        assert self._reader is None, f"{self.name} is already reading"
        self._reader = asyncio.create_task(self._read(self.call), name=f"read-{self.name}")

    async def resume(self, service: Service) -> ChatClient:
        """Reconnects to `service`, resuming after the last sequence received."""
        return await self.connect(service, resume_after=self.last_sequence)

    async def _read(self, call: Any) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                self.received.append(message)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended = True

    @property
    def code(self) -> grpc.StatusCode | None:
        return None if self.error is None else self.error.code()

    @property
    def sequences(self) -> list[int]:
        return [m.sequence for m in self.received]

    @property
    def last_sequence(self) -> int:
        return self.received[-1].sequence if self.received else 0

    @property
    def acknowledged(self) -> set[str]:
        return {
            m.client_message_id
            for m in self.received
            if m.user_id == self.person.id and m.client_message_id
        }

    async def send(self, text: str, client_message_id: str | None = None) -> str:
        """Writes one message; a client id is made up unless given ('' sends none)."""
        if client_message_id is None:
            client_message_id = f"{self.name}-{len(self.outbox) + 1}"
        if client_message_id:
            self.outbox.setdefault(client_message_id, text)
        await self.call.write(chat_pb2.ChatMessage(text=text, client_message_id=client_message_id))
        return client_message_id

    def queue(self, texts: Sequence[str]) -> None:
        """Adds messages to the outbox without sending them (see `send_pending`)."""
        for text in texts:
            self.outbox[f"{self.name}-{len(self.outbox) + 1}"] = text

    async def send_pending(self) -> int:
        """Writes every outbox message not yet acknowledged, in order, until the stream fails;
        returns how many were written."""
        acknowledged = self.acknowledged
        written = 0
        for client_message_id, text in list(self.outbox.items()):
            if client_message_id in acknowledged:
                continue
            try:
                await self.call.write(
                    chat_pb2.ChatMessage(text=text, client_message_id=client_message_id)
                )
            except WRITE_ERRORS:
                return written
            written += 1
        return written

    async def wait_until_ended(self, timeout: float = 10) -> grpc.StatusCode | None:
        await wait_until(lambda: self.ended, timeout, f"the stream of {self.name} to end")
        if self._reader is not None:
            await self._reader
        return self.code

    async def close(self) -> None:
        if self.call is not None and not self.ended:
            self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self.ended = True


class Chat:
    """Makes chat clients for a test and closes them afterwards."""

    def __init__(self, channels: Channels) -> None:
        self.channels = channels
        self.clients: list[ChatClient] = []

    async def __call__(
        self,
        person: Person,
        service: Service | None = None,
        *,
        room: str | None = "general",
        resume_after: int | str | None = None,
        channel_key: Any = None,
        **options: Any,
    ) -> ChatClient:
        """A client for `person` in `room`, connected to `service` when one is given (see
        `ChatClient.connect` for the options)."""
        client = ChatClient(self.channels, person, room)
        self.clients.append(client)
        if service is not None:
            await client.connect(
                service, resume_after=resume_after, channel_key=channel_key, **options
            )
        return client

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))


@pytest.fixture
async def chat(channels: Channels) -> AsyncIterator[Chat]:
    """`await chat(person, service, room=..., resume_after=...)`: a connected ChatClient."""
    maker = Chat(channels)
    try:
        yield maker
    finally:
        await maker.close()


async def presence(
    channels: Channels, service: Service, person: Person, room: str
) -> dict[int, tuple[str, int]]:
    """ListPresence of a room as {user_id: (name, stream_count)}."""
    stub = chat_pb2_grpc.ChatServiceStub(channels.get(service.target))
    reply = await stub.ListPresence(
        chat_pb2.ListPresenceRequest(room=room), metadata=bearer(person.token), timeout=5
    )
    return {m.user_id: (m.user, m.stream_count) for m in reply.members}


@pytest.fixture
def list_presence(channels: Channels) -> Callable[..., Awaitable[dict[int, tuple[str, int]]]]:
    """`await list_presence(service, person, room)`: {user_id: (name, stream_count)}."""

    async def call(service: Service, person: Person, room: str) -> dict[int, tuple[str, int]]:
        return await presence(channels, service, person, room)

    return call


async def wait_for_streams(
    channels: Channels,
    service: Service,
    person: Person,
    room: str,
    expected: dict[int, int],
    timeout: float = 15,
) -> None:
    """Waits until ListPresence shows exactly `expected` ({user_id: stream_count}).

    A stream is listed once it has joined its room and chosen its starting point, so after
    this every new message of the room must reach it."""

    last: list[dict[int, int]] = [{}]

    async def matches() -> bool:
        found = await presence(channels, service, person, room)
        last[0] = {uid: count for uid, (_, count) in found.items()}
        return last[0] == expected

    try:
        await wait_until(matches, timeout, f"presence in {room} to be {expected}")
    except pytest.fail.Exception:
        pytest.fail(f"presence in {room}: expected {expected}, last saw {last[0]}")


@pytest.fixture
def streams_joined(channels: Channels) -> Callable[..., Awaitable[None]]:
    """`await streams_joined(service, person, room, {user_id: count})`: see wait_for_streams."""

    async def call(
        service: Service,
        person: Person,
        room: str,
        expected: dict[int, int],
        timeout: float = 15,
    ) -> None:
        await wait_for_streams(channels, service, person, room, expected, timeout)

    return call


def expected_counts(clients: Sequence[ChatClient]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for client in clients:
        counts[client.person.id] = counts.get(client.person.id, 0) + 1
    return counts


@pytest.fixture
def stream_counts() -> Callable[[Sequence[ChatClient]], dict[int, int]]:
    """`stream_counts(clients)`: {user_id: number of clients}, as presence should list them."""
    return expected_counts


def check_conversation(clients: Sequence[ChatClient], rows: Sequence[StoredMessage]) -> None:
    """Every client received every stored message exactly once, in sequence order, as stored;
    and every outbox message is stored exactly once."""
    assert [row.sequence for row in rows] == list(range(1, len(rows) + 1)), "sequence gap"
    truth = [(row.sequence, row.user_id, row.text, row.client_message_id) for row in rows]
    for client in clients:
        seen = [(m.sequence, m.user_id, m.text, m.client_message_id) for m in client.received]
        missing = sorted({t[0] for t in truth} - {s[0] for s in seen})
        assert client.sequences == list(range(1, len(rows) + 1)), (
            f"{client.name}: {len(client.received)} messages for {len(rows)} stored; "
            f"missing {missing[:20]}; duplicated "
            f"{sorted({s for s in client.sequences if client.sequences.count(s) > 1})[:20]}"
        )
        assert seen == truth, f"{client.name} received messages that differ from the stored ones"
    stored_ids = [(row.user_id, row.client_message_id) for row in rows if row.client_message_id]
    assert len(stored_ids) == len(set(stored_ids)), "a client message id was stored twice"
    for client in clients:
        mine = [row.client_message_id for row in rows if row.user_id == client.person.id]
        for client_message_id in client.outbox:
            assert client_message_id in mine, f"{client_message_id} of {client.name} was lost"


@pytest.fixture
def conversation_intact() -> Callable[[Sequence[ChatClient], Sequence[StoredMessage]], None]:
    """`conversation_intact(clients, rows)`: asserts zero lost, zero duplicated, in order."""
    return check_conversation
