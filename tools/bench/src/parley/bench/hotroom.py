"""A hot room: messages stored a second when many writers share one room, against the same
writers each in a room of its own, measured in the same run with the same client.

Each writer is a user of its own (so no per-user limit is shared) with one StreamChat stream,
the writers alternating between the two replicas, and keeps `chat_window` messages
unacknowledged (a message is acknowledged when it comes back on its sender's stream). Every
message is stored by one statement that takes the room's next sequence under the room's row
lock, so one room's writers wait for each other where separate rooms' do not. Measured over
the window after a warm-up: messages stored a second (the rooms' `last_sequence` in Postgres
at the window's start and end), send-to-acknowledgement p50 and p99, and, to tell what limits
the room, what the stores wait for in Postgres (pg_stat_activity sampled every 50 ms: the
row lock, the WAL flush, the CPU) and the CPU the replicas, this database's Postgres
backends, the client and the whole machine used, from /proc. Then one room again with 1 and
with a quarter of the writers: a room bound by its lock stores about as many with fewer.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import psycopg

from parley.bench.chat import STREAM_CHAT, chat_tokens
from parley.bench.loadgen import percentile
from parley.bench.plan import Plan
from parley.bench.procfs import cpu_seconds, machine_busy_seconds
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import chat_pb2
from parley.proto.contract import ROOM_KEY

__all__ = ["HotRoomPhase", "measure_hot_room", "summarize_waits"]

SAMPLE_INTERVAL = 0.05
DRAIN_TIMEOUT = 30.0
# What a store waits for, by pg_stat_activity's wait_event_type:wait_event.
LOCK_WAITS = ("Lock:transactionid", "Lock:tuple")
WAL_WAITS = ("IO:WALSync", "IO:WALWrite", "LWLock:WALWrite", "LWLock:WALInsert")

_ACTIVITY = """
SELECT wait_event_type, wait_event, query LIKE '%chat_send_budgets%' FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
"""
_BACKENDS = """
SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
_STORED = "SELECT coalesce(sum(last_sequence), 0) FROM chat_rooms WHERE name = ANY(%s)"


def _passthrough(data: bytes) -> bytes:
    return data


def summarize_waits(store_samples: Mapping[str, int], samples: int) -> dict[str, float]:
    """From counts of stores seen active in Postgres by what they waited for ("CPU": for
    nothing) over `samples` samples: stores active at once on average, and the share of
    them waiting for a row lock, for the WAL, on the CPU, and for anything else."""
    seen = sum(store_samples.values())
    if not samples or not seen:
        return {"active": 0.0, "lock": 0.0, "wal": 0.0, "cpu": 0.0, "other": 0.0}
    lock = sum(n for k, n in store_samples.items() if k in LOCK_WAITS)
    wal = sum(n for k, n in store_samples.items() if k in WAL_WAITS)
    cpu = store_samples.get("CPU", 0)
    return {
        "active": seen / samples,
        "lock": lock / seen,
        "wal": wal / seen,
        "cpu": cpu / seen,
        "other": (seen - lock - wal - cpu) / seen,
    }


class _Writer:
    """One writer's stream: it sends, and reads its room to see its acknowledgements."""

    def __init__(
        self, number: int, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.mine = f"w{number}"
        self.call = channel.stream_stream(
            STREAM_CHAT, request_serializer=_passthrough, response_deserializer=_passthrough
        )(metadata=metadata)
        self.sent = 0
        self.acked = 0
        self.received = 0  # every message of the room that reached this stream
        self.window = (0, 0)  # monotonic ns
        self.acked_in_window = 0
        self.received_in_window = 0
        self.latencies = array("d")  # seconds, acknowledgements inside the window
        self.progress = asyncio.Event()
        self.error: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.call:
                now = time.monotonic_ns()
                self.received += 1
                inside = self.window[0] <= now <= self.window[1]
                self.received_in_window += inside
                sender, _, sent = chat_pb2.ChatMessage.FromString(raw).text.partition(" ")
                if sender == self.mine:
                    self.acked += 1
                    if inside:
                        self.acked_in_window += 1
                        self.latencies.append((now - int(sent)) / 1e9)
                    self.progress.set()
            self.error = "EOF"
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"
        finally:
            self.progress.set()

    async def opened(self) -> None:
        try:
            await self.call.initial_metadata()
        except grpc.aio.AioRpcError:
            pass  # the reader has it
        if self.error is not None:
            raise RuntimeError(f"writer {self.mine}'s stream ended: {self.error}")

    async def pump(self, window: int, until: int) -> None:
        """Sends until `until` (monotonic ns), `window` messages unacknowledged at most."""
        while time.monotonic_ns() < until:
            while self.sent - self.acked >= window:
                if self.error is not None:
                    raise RuntimeError(f"writer {self.mine}'s stream ended: {self.error}")
                self.progress.clear()
                await asyncio.wait_for(self.progress.wait(), DRAIN_TIMEOUT)
            text = f"{self.mine} {time.monotonic_ns()}"
            await self.call.write(chat_pb2.ChatMessage(text=text).SerializeToString())
            self.sent += 1

    async def drain(self) -> None:
        async def all_acked() -> None:
            while self.acked < self.sent and self.error is None:
                self.progress.clear()
                await self.progress.wait()

        await asyncio.wait_for(all_acked(), DRAIN_TIMEOUT)

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


@dataclass
class HotRoomPhase:
    """One phase's measured window."""

    rooms: int
    writers: int
    duration: float
    stored: int | None  # messages Postgres stored in the window (None: no database at hand)
    acked: int
    deliveries: int  # messages the writers' streams received in the window, theirs included
    latencies: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds a second, by process
    machine_busy: float = 0.0  # of the machine's CPUs, busy on average
    cpus: int = 0
    waits: dict[str, float] = field(default_factory=dict)
    store_waits: dict[str, int] = field(default_factory=dict)
    other_waits: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def summary(self) -> dict[str, Any]:
        """Everything but the latencies themselves (for the JSON report)."""
        data = {k: v for k, v in asdict(self).items() if k != "latencies"}
        data.update(acknowledgements=len(self.latencies), rate=self.rate)
        return data

    @property
    def rate(self) -> float:
        """Messages stored a second (acknowledged ones where Postgres was not read)."""
        count = self.acked if self.stored is None else self.stored
        return count / self.duration

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


class _Watcher:
    """Postgres and /proc around the measured window: stored counts, waits, CPU."""

    def __init__(self, database_url: str | None, rooms: list[str], pids: dict[str, int]) -> None:
        self.database_url = database_url
        self.rooms = rooms
        self.pids = dict(pids, client=os.getpid())
        self.store_waits: Counter[str] = Counter()
        self.other_waits: Counter[str] = Counter()
        self.samples = 0
        self.stored: int | None = None
        self.cpu: dict[str, float] = {}
        self.busy = 0.0
        self.cpus = 0

    def _cpu(self, backends: list[int]) -> dict[str, float]:
        used = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        total = 0.0
        for pid in backends:
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass  # a backend that went away: its CPU is not counted
        used["postgres"] = total
        return used

    async def watch(self, start: int, end: int) -> None:
        """Samples from monotonic ns `start` to `end`."""
        conn = None
        if self.database_url is not None:
            conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        try:
            await asyncio.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
            backends: list[int] = []
            stored_before = 0
            if conn is not None:
                backends = [int(r[0]) for r in await (await conn.execute(_BACKENDS)).fetchall()]
                stored_before = await self._stored(conn)
            cpu_before, (busy_before, self.cpus) = self._cpu(backends), machine_busy_seconds()
            wall = time.monotonic()
            while time.monotonic_ns() < end:
                if conn is not None:
                    for kind, event, is_store in await (await conn.execute(_ACTIVITY)).fetchall():
                        key = "CPU" if kind is None else f"{kind}:{event}"
                        (self.store_waits if is_store else self.other_waits)[key] += 1
                    self.samples += 1
                await asyncio.sleep(SAMPLE_INTERVAL)
            if conn is not None:
                self.stored = await self._stored(conn) - stored_before
            seconds = time.monotonic() - wall
            after = self._cpu(backends)
            self.cpu = {name: (after[name] - cpu_before[name]) / seconds for name in after}
            self.busy = (machine_busy_seconds()[0] - busy_before) / seconds
        finally:
            if conn is not None:
                await conn.close()

    async def _stored(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
        row = await (await conn.execute(_STORED, (self.rooms,))).fetchone()
        return int(row[0]) if row else 0


async def _phase(target: Target, tokens: list[str], rooms: list[str], plan: Plan) -> HotRoomPhase:
    """`tokens[i]` writes into `rooms[i % len(rooms)]` on replica i % 2."""
    channels = [
        grpc.aio.insecure_channel(
            target.chats[i % 2], options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for i in range(len(tokens))
    ]
    writers = [
        _Writer(
            i,
            channels[i],
            (("authorization", f"Bearer {token}"), (ROOM_KEY, rooms[i % len(rooms)])),
        )
        for i, token in enumerate(tokens)
    ]
    pids = {
        name: pid
        for name, pid in (("replica A", target.chat_pid(0)), ("replica B", target.chat_pid(1)))
        if pid is not None
    }
    database_url = target.endpoints.database_url if target.endpoints is not None else None
    watcher = _Watcher(database_url, sorted(set(rooms)), pids)
    try:
        await asyncio.wait_for(asyncio.gather(*(w.opened() for w in writers)), 60)
        start = time.monotonic_ns() + int(plan.warm_up * 1e9)
        end = start + int(plan.duration * 1e9)
        for writer in writers:
            writer.window = (start, end)
        await asyncio.gather(
            watcher.watch(start, end), *(w.pump(plan.chat_window, end) for w in writers)
        )
        await asyncio.gather(*(w.drain() for w in writers))
        for writer in writers:
            if writer.error is not None:
                raise RuntimeError(f"writer {writer.mine}'s stream ended: {writer.error}")
    finally:
        for writer in writers:
            writer.close()
        for channel in channels:
            await channel.close()
    latencies = sorted(v for w in writers for v in w.latencies)
    return HotRoomPhase(
        rooms=len(set(rooms)),
        writers=len(writers),
        duration=plan.duration,
        stored=watcher.stored,
        acked=sum(w.acked_in_window for w in writers),
        deliveries=sum(w.received_in_window for w in writers),
        latencies=latencies,
        cpu=watcher.cpu,
        machine_busy=watcher.busy,
        cpus=watcher.cpus,
        waits=summarize_waits(watcher.store_waits, watcher.samples),
        store_waits=dict(watcher.store_waits),
        other_waits=dict(watcher.other_waits),
        samples=watcher.samples,
    )


def _notes(phase: HotRoomPhase, window: int) -> str:
    parts = [
        f"{phase.writers} writers ({window} unacknowledged each) on 2 replicas into "
        f"{phase.rooms} room(s); {phase.acked / phase.duration:,.0f} acknowledged/s, "
        f"{phase.deliveries / phase.duration:,.0f} deliveries/s to the writers' streams"
    ]
    if phase.cpu:
        cores = ", ".join(f"{name} {used:.2f}" for name, used in phase.cpu.items())
        parts.append(f"CPU (cores): {cores}; machine {phase.machine_busy:.2f} of {phase.cpus} busy")
    if phase.samples:
        waits = phase.waits
        top = Counter(phase.store_waits).most_common(4)
        parts.append(
            f"stores active in Postgres at once: {waits['active']:.1f} on average, "
            f"{waits['lock']:.0%} waiting for a row lock, {waits['wal']:.0%} for the WAL, "
            f"{waits['cpu']:.0%} on the CPU, {waits['other']:.0%} other ("
            + ", ".join(f"{k} {n / phase.samples:.2f}" for k, n in top)
            + ")"
        )
    return "; ".join(parts)


def measure_hot_room(target: Target, plan: Plan, report: Report) -> None:
    count = plan.hot_senders
    _, tokens = chat_tokens(target, count)
    tag = uuid.uuid4().hex[:8]
    spread = asyncio.run(_phase(target, tokens, [f"spread-{tag}-{i}" for i in range(count)], plan))
    hot = asyncio.run(_phase(target, tokens, [f"hot-{tag}"], plan))
    # How the one room's rate grows with its writers: fewer writers, each in a new room.
    fewer = sorted({1, count // 4} - {0, count})
    sweep = [asyncio.run(_phase(target, tokens[:n], [f"hot-{tag}-{n}"], plan)) for n in fewer]
    basis = "stored" if spread.stored is not None else "acknowledged"
    report.add(
        Row(
            name=f"baseline: {count} chat writers, each in a room of its own",
            throughput=spread.rate,
            unit=f"msgs {basis}/s",
            p50=spread.p50 or None,
            p99=spread.p99 or None,
            ratio=1.0,
            ratio_basis="itself",
            notes=_notes(spread, plan.chat_window),
            broken=spread.rate <= 0,
            details=spread.summary(),
        )
    )
    notes = _notes(hot, plan.chat_window)
    if sweep:
        notes += "; the same with fewer writers in one room: " + ", ".join(
            f"{p.writers} writer(s) {p.rate:,.0f} msgs/s (p50 {p.p50 * 1000:.0f} ms, "
            f"{p.waits.get('lock', 0.0):.0%} of stores waiting for the row lock)"
            for p in sweep
        )
    row = Row(
        name=f"hot room: {count} chat writers in one room",
        throughput=hot.rate,
        unit=f"msgs {basis}/s",
        p50=hot.p50 or None,
        p99=hot.p99 or None,
        ratio_basis=f"msgs {basis}/s vs a room each",
        notes=notes,
        broken=hot.rate <= 0,
        details=dict(hot.summary(), fewer_writers=[p.summary() for p in sweep]),
    )
    if spread.rate > 0:
        row.ratio = hot.rate / spread.rate
    report.add(row)
