"""Fault tests: real `parley-user serve` / `parley-chat serve` processes on a private Postgres
cluster and a private redis-server, both started by the tests on ports of their own, so that
the tests may stop, kill and restart any of them.

Helpers: `cluster` (Postgres + Redis + migrated database), `fleet` (service processes, each
on a fixed port that survives restarts), `people` (users created through the SDK), and
`Tally` (what a load of calls measured).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from parley.client import AsyncChatClient, AsyncUserClient, ChatSession, ReconnectPolicy
from parley.devstack.postgres import EmbeddedPostgres
from parley.testing import RedisServer, free_port, health_status, make_token, wait_until
from parley.testing.schemas import migrate_both

JWT_SECRET = os.urandom(32).hex()
BIN = Path(sys.executable).parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_NAMES = {"user": "user.UserService", "chat": "chat.ChatService"}
USER_DEPENDENCY = "dependency/user-service"
_SERVING_LINE = re.compile(r"serving gRPC on \S+:(\d+), metrics on \S+:(\d+)")


# Tokens live as long as a whole `make test` may run: ADMIN_TOKEN is made when this module is
# imported, and these tests run last, more than the default 10 minutes later on a busy machine.
TOKEN_TTL = 3 * 3600


def token(sub: str, scope: str = "") -> str:
    return make_token(JWT_SECRET, sub, scope, ttl=TOKEN_TTL)


ADMIN_TOKEN = token("faults-admin", "users:write")


# --- Postgres and Redis ---------------------------------------------------------------------


class Postgres:
    """A Postgres cluster of the test's own (run as an unprivileged user when we are root),
    on a fixed port: stop() and start() again on the same data directory."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.server = EmbeddedPostgres(
            directory / "data", self.port, log_path=directory / "postgres.log", durable=False
        )

    def url(self, database: str = "postgres") -> str:
        return self.server.dsn(database)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start, timeout=60)

    async def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back, clients disconnected."""
        await asyncio.to_thread(self.server.stop)


@dataclass
class Cluster:
    postgres: Postgres
    redis: RedisServer
    database: str  # URL of the migrated database
    prefix: str  # Redis key prefix


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A private Postgres (with a migrated database) and a private Redis, both running."""
    # Not under tmp_path: pytest runs of other checkouts prune old basetemp directories.
    own = Path(tempfile.mkdtemp(prefix="parley-faults-"))
    (own / "pg").mkdir()
    (tmp_path / "redis").mkdir()
    postgres = Postgres(own / "pg")
    redis = RedisServer(tmp_path / "redis")
    try:
        await asyncio.gather(postgres.start(), redis.start())
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE parley_faults")
        database = postgres.url("parley_faults")
        await migrate_both(database)
        yield Cluster(postgres, redis, database, f"faults-{uuid.uuid4().hex[:10]}")
    finally:
        await redis.stop()
        await postgres.stop()
        shutil.rmtree(own, ignore_errors=True)


# --- Service processes ----------------------------------------------------------------------


@dataclass
class Proc:
    """One `parley-<kind> serve` process; `port` stays the same across restarts."""

    kind: str
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def health_name(self) -> str:
        return HEALTH_NAMES[self.kind]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def metrics_port(self) -> int:
        """The metrics port of the current (last started) process."""
        return int(_SERVING_LINE.findall(self.log_text())[-1][1])

    async def handled(self, methods: Sequence[str]) -> float:
        """How many calls of `methods` the current process completed (grpc_server_handled)."""

        def scrape() -> float:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_method") in methods
            )

        return await asyncio.to_thread(scrape)

    async def health(self, name: str | None = None) -> int | None:
        """The readiness it reports for `name` (default: its own service); None if unreachable."""
        try:
            return await health_status(self.port, name or self.health_name)
        except grpc.aio.AioRpcError:
            return None


class Fleet:
    """Starts service processes for one test and kills whatever still runs afterwards."""

    def __init__(self, cluster: Cluster, tmp_path: Path) -> None:
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def env(self, kind: str, port: int, **overrides: str) -> dict[str, str]:
        env = {
            "PARLEY_DATABASE_URL": self.cluster.database,
            "PARLEY_JWT_SECRET": JWT_SECRET,
            "PARLEY_GRPC_HOST": "127.0.0.1",
            "PARLEY_GRPC_PORT": str(port),
            "PARLEY_METRICS_HOST": "127.0.0.1",
            "PARLEY_METRICS_PORT": "0",
            "PARLEY_HEALTH_CHECK_INTERVAL": "0.2",
            "PARLEY_SHUTDOWN_GRACE": "5",
            "PARLEY_DB_POOL_TIMEOUT": "1",
            "PARLEY_LOG_LEVEL": "INFO",
        }
        if kind == "chat":
            env.update(
                PARLEY_REDIS_URL=self.cluster.redis.url,
                PARLEY_REDIS_PREFIX=self.cluster.prefix,
                PARLEY_CHAT_RATE_LIMIT="100000",
                PARLEY_CHAT_RATE_BURST="100000",
                PARLEY_CHAT_RESYNC_INTERVAL="0.5",
            )
        env.update(overrides)
        return env

    async def add(self, kind: str, *, ready: bool = True, **overrides: str) -> Proc:
        port = free_port()
        proc = Proc(
            kind,
            port,
            self.env(kind, port, **overrides),
            self.tmp_path / f"parley-{kind}-{len(self.procs) + 1}.log",
        )
        self.procs.append(proc)
        await self.start(proc, ready=ready)
        return proc

    async def start(self, proc: Proc, *, ready: bool = True) -> None:
        assert proc.process is None or proc.process.poll() is not None, "still running"
        proc.starts += 1
        with open(proc.log, "ab") as out:
            proc.process = subprocess.Popen(
                [str(BIN / f"parley-{proc.kind}"), "serve"],
                env={**os.environ, **proc.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = proc.process
        seen = proc.log_text().count("serving gRPC on")

        def listening() -> bool:
            if process.poll() is not None:
                pytest.fail(f"parley-{proc.kind} serve exited early:\n{proc.log_text()}")
            return proc.log_text().count("serving gRPC on") > seen

        await wait_until(listening, 30, f"parley-{proc.kind} serve to listen on {proc.port}")
        if ready:
            await self.wait_health(proc, SERVING, 20)

    async def wait_health(
        self, proc: Proc, status: int, timeout: float, name: str | None = None
    ) -> float:
        """Waits until `proc` reports `status` for `name`; returns the seconds it took."""
        started = time.monotonic()

        async def reached() -> bool:
            return await proc.health(name) == status

        label = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        await wait_until(reached, timeout, f"{name or proc.health_name} on {proc.port}: {label}")
        return time.monotonic() - started

    async def terminate(self, proc: Proc, timeout: float = 30) -> tuple[float, int]:
        """SIGTERM, then waits for the exit; returns (seconds to exit, exit code)."""
        assert proc.process is not None
        started = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.process.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.process.kill()
            await asyncio.to_thread(proc.process.wait)
            pytest.fail(f"parley-{proc.kind} did not exit {timeout}s after SIGTERM")
        return time.monotonic() - started, code

    async def kill(self, proc: Proc) -> None:
        assert proc.process is not None
        proc.process.kill()
        await asyncio.to_thread(proc.process.wait)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.process is not None and proc.process.poll() is None:
                proc.process.kill()
            if proc.process is not None:
                await asyncio.to_thread(proc.process.wait)


@pytest.fixture
async def fleet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Fleet]:
    fleet = Fleet(cluster, tmp_path)
    try:
        yield fleet
    finally:
        await fleet.close()


def ipv4_target(procs: Sequence[Proc]) -> str:
    """One gRPC target over several replicas (round_robin spreads calls over them)."""
    return "ipv4:" + ",".join(p.target for p in procs)


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    token: str


async def create_people(user_target: str, names: Sequence[str]) -> list[Person]:
    async with AsyncUserClient(user_target, token=ADMIN_TOKEN) as users:
        people = []
        for name in names:
            email = f"{name.lower()}.{uuid.uuid4().hex[:8]}@example.com"
            user = await users.create_user(name=name, email=email, age=30)
            people.append(Person(user.id, user.name, token(str(user.id))))
        return people


async def stored_rows(database: str, room: str) -> list[tuple[int, int, str, str]]:
    """(sequence, user_id, text, client_message_id) of a room's stored messages, by sequence."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT sequence, user_id, text, client_message_id FROM chat_messages"
            " WHERE room = %s ORDER BY sequence",
            (room,),
        )
        return list(await cur.fetchall())


def check_room(
    rows: Sequence[tuple[int, int, str, str]],
    sent: dict[str, str],
    received: dict[str, list[tuple[int, str]]],
) -> None:
    """Zero lost, zero duplicated: every sent client id stored once, sequences contiguous,
    every reader got every stored message exactly once in order."""
    sequences = [row[0] for row in rows]
    assert sequences == list(range(1, len(rows) + 1)), f"stored sequences have gaps: {sequences}"
    stored_ids = Counter(row[3] for row in rows)
    twice = [cid for cid, n in stored_ids.items() if n > 1]
    assert not twice, f"{len(twice)} client ids stored more than once, e.g. {twice[:5]}"
    lost = [cid for cid in sent if cid not in stored_ids]
    assert not lost, f"{len(lost)} of {len(sent)} sent messages were never stored: {lost[:5]}"
    truth = [(row[0], row[2]) for row in rows]
    for name, got in received.items():
        got_seq = [s for s, _ in got]
        missing = sorted(set(sequences) - set(got_seq))
        dup = sorted({s for s in got_seq if got_seq.count(s) > 1})
        assert got == truth, (
            f"reader {name}: {len(got)} messages for {len(rows)} stored; missing {missing[:10]}, "
            f"duplicated {dup[:10]}"
        )


@dataclass
class Tally:
    """Outcomes of a load of calls: ok count and error codes, with timings."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        name = type(error).__name__
        self.errors[name] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{name}: {error}")

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def __str__(self) -> str:
        return f"ok={self.ok} failed={self.failed} {dict(self.errors)} {self.examples}"


# --- Chat load through the SDK --------------------------------------------------------------

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, settle=0.3, give_up_after=60)


class Chatter:
    """One SDK chat session in `room` from the room's start: sends paced messages on demand
    and records everything it receives."""

    def __init__(self, name: str, person: Person, targets: Sequence[str], room: str) -> None:
        self.name = name
        self.person = person
        self.targets = list(targets)
        self.client = AsyncChatClient(",".join(targets), token=person.token, timeout=10)
        self.room = room
        self.sent: dict[str, str] = {}
        self.received: list[tuple[int, str]] = []
        self.session: ChatSession | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.session = self.client.session(self.room, resume_after=0, policy=FAST_RECONNECT)
        await self.session.open()
        self._reader = asyncio.create_task(self._read(), name=f"read-{self.name}")

    async def _read(self) -> None:
        assert self.session is not None
        async for message in self.session:
            self.received.append((message.sequence, message.text))

    async def chat(self, stop: asyncio.Event, interval: float) -> None:
        """Sends a message every `interval` seconds (pacing, not synchronization) until `stop`."""
        assert self.session is not None
        while not stop.is_set():
            text = f"{self.name}-{len(self.sent) + 1}"
            self.sent[await self.session.send(text)] = text
            await asyncio.sleep(interval)

    async def settle(self, last_sequence: int, timeout: float = 30) -> None:
        """Waits until everything it sent is acknowledged and it received up to the sequence."""
        assert self.session is not None
        await self.session.wait_acknowledged(timeout=timeout)
        await wait_until(
            lambda: bool(self.received) and self.received[-1][0] >= last_sequence,
            timeout,
            f"{self.name} to receive up to sequence {last_sequence}",
        )

    @property
    def reconnects(self) -> int:
        return self.session.reconnects if self.session else 0

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.close()


async def settle_room(
    chatters: Sequence[Chatter], database: str, room: str, timeout: float = 30
) -> list[tuple[int, int, str, str]]:
    """Waits for every chatter to be acknowledged and caught up; checks zero lost, zero
    duplicated; returns the stored rows."""
    for chatter in chatters:
        assert chatter.session is not None
        await chatter.session.wait_acknowledged(timeout=timeout)
    rows = await stored_rows(database, room)
    await asyncio.gather(*(c.settle(len(rows), timeout) for c in chatters))
    sent = {cid: text for c in chatters for cid, text in c.sent.items()}
    check_room(rows, sent, {c.name: c.received for c in chatters})
    return rows
