"""Idle chat streams on one replica: the replica's memory per stream, and how long one
message takes to reach every one of them, against the bare broadcast server with the same
streams and the same client.

Memory: one replica's resident memory with no stream open and with N idle StreamChat streams
open, once the replica itself counts all of them, against the broadcast server's with the same
streams. A smaller crowd comes and goes first, so the measurement with no stream has the pools
and allocator arenas a loaded server has.

Delivery: one message at a time (a few rounds), sent on a stream of another user on the same
replica; each listener notes when it arrived (time.monotonic_ns, the clock the sender noted
the send on), and p50 and p99 are taken across every stream and round, with the CPU the
server and the client used for each round. The same crowd then listens on the bare grpc.aio
broadcast server (baseline.py): what grpc.aio and this client take for the same fan-out.
The client, one process holding every stream, runs its young garbage collections less
often meanwhile: 10,000 separate clients would not all wait for one collector.

Streams go out as real clients' would: over connections of their own (a channel with its own
subchannel pool: grpc otherwise shares one connection between channels to one address), 200
streams each (the services' default PARLEY_MAX_STREAMS_PER_CONNECTION), opened in waves of at
most 1,000, each wave once the server has sent the headers of the one before (Parley sends
them once a stream has joined its room). Streams that end while opening, idling or
listening are counted and reported, never hidden; the memory is divided by the streams
actually open.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import resource
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from parley.bench.baseline import BROADCAST_METHOD, start_broadcast_server
from parley.bench.chat import STREAM_CHAT, chat_tokens
from parley.bench.loadgen import percentile
from parley.bench.plan import Plan
from parley.bench.procfs import cpu_seconds, rss_bytes
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import chat_pb2
from parley.proto.contract import ROOM_KEY

__all__ = [
    "Crowd",
    "Fanout",
    "Listening",
    "delivery_times",
    "measure_idle",
    "raise_open_files",
    "wait_until",
]

STREAMS_PER_CONNECTION = 200
OPEN_WAVE = 1000
ROUNDS = 5  # messages sent one at a time to the whole crowd
ROUND_TIMEOUT = 30.0
TARGET_BYTES = 30_000
TARGET_P99 = 1.0  # seconds, one message to every stream
CLIENT_GC_THRESHOLD = 100_000  # allocations between the client's young collections (700)

Metadata = tuple[tuple[str, str], ...]


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raises this process's soft RLIMIT_NOFILE towards `needed` (never past the hard limit,
    never lower than it was); returns the soft limit before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return soft, wanted
    return soft, soft


def _open_streams(metrics_address: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("parley_chat_streams ") or line.startswith("parley_chat_streams{"):
                return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no parley_chat_streams on {metrics_address}")


class Listening:
    """A StreamChat call (or one of the broadcast server's) that keeps the texts it
    receives, and when each arrived (monotonic ns); it may send too."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: Metadata, method: str = STREAM_CHAT
    ) -> None:
        self.call = channel.stream_stream(
            method,
            request_serializer=chat_pb2.ChatMessage.SerializeToString,
            response_deserializer=chat_pb2.ChatMessage.FromString,
        )(metadata=metadata)
        self.texts: list[str] = []
        self.arrived: list[int] = []
        self.ended: str | None = None
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        try:
            async for message in self.call:
                self.arrived.append(time.monotonic_ns())
                self.texts.append(message.text)
            self.ended = "EOF"
        except grpc.aio.AioRpcError as error:
            self.ended = error.code().name
        except asyncio.CancelledError:
            self.ended = self.ended or "closed"

    async def opened(self) -> None:
        """Returns once the server has sent the stream's headers, or the stream ended."""
        try:
            await self.call.initial_metadata()
        except grpc.aio.AioRpcError:
            pass  # counted by _listen

    async def close(self) -> None:
        if self.ended is None:
            self.ended = "closed"
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> None:
    """Waits until `condition()` (awaited when it returns an awaitable) is true, checking
    every `interval` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def delivery_times(sent_ns: int, arrivals: Sequence[int | None]) -> tuple[list[float], int]:
    """Seconds from `sent_ns` to each arrival (monotonic ns), sorted; and how many streams
    never had it (None)."""
    times = sorted((arrival - sent_ns) / 1e9 for arrival in arrivals if arrival is not None)
    return times, sum(1 for arrival in arrivals if arrival is None)


@dataclass
class Fanout:
    """One message at a time to a whole crowd: every delivery's time, in seconds."""

    times: list[float] = field(default_factory=list)
    round_p99: list[float] = field(default_factory=list)
    missing: int = 0  # deliveries to streams open when the message was sent that never came
    # Each round, send to last arrival: how long it took, and the CPU seconds the server and
    # this (the client's) process used in it.
    wall: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.times, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.times, 0.99)

    def summary(self) -> dict[str, Any]:
        """Everything but the times themselves (for the JSON report)."""
        return {k: v for k, v in asdict(self).items() if k != "times"}

    def add(self, times: list[float], missing: int) -> None:
        self.times = sorted(self.times + times)
        self.round_p99.append(percentile(times, 0.99))
        self.missing += missing


class Crowd:
    """`count` idle streams on connections of their own, `STREAMS_PER_CONNECTION` each."""

    def __init__(self, address: str, method: str, metadata: Metadata, count: int) -> None:
        self.address = address
        self.method = method
        self.metadata = metadata
        self.count = count
        self.channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(1, math.ceil(count / STREAMS_PER_CONNECTION)))
        ]
        self.streams: list[Listening] = []
        self.opening = 0.0  # seconds from the first stream started to the last one's headers

    async def open(self) -> None:
        started = time.monotonic()
        for first in range(0, self.count, OPEN_WAVE):
            wave = [
                Listening(self.channels[i // STREAMS_PER_CONNECTION], self.metadata, self.method)
                for i in range(first, min(self.count, first + OPEN_WAVE))
            ]
            self.streams += wave
            await asyncio.wait_for(asyncio.gather(*(s.opened() for s in wave)), 120)
        self.opening = time.monotonic() - started

    def ended(self) -> Counter[str]:
        return Counter(s.ended for s in self.streams if s.ended is not None)

    async def send_rounds(
        self, sender: Listening, rounds: int, tag: str, server_pid: int
    ) -> Fanout:
        """Sends `rounds` messages on `sender`, one at a time, each once the one before has
        reached every stream still open (or ROUND_TIMEOUT has passed)."""
        fanout = Fanout()
        client = os.getpid()
        for number in range(rounds):
            text = f"{tag} {number} {uuid.uuid4().hex[:8]}"
            live = [s for s in self.streams if s.ended is None]
            server_before, client_before = cpu_seconds(server_pid), cpu_seconds(client)
            sent = time.monotonic_ns()
            await sender.call.write(chat_pb2.ChatMessage(text=text))

            def reached(live: list[Listening] = live, text: str = text) -> bool:
                return all(s.ended is not None or text in s.texts for s in live)

            try:
                await wait_until(reached, ROUND_TIMEOUT, "a message to reach every stream", 0.02)
            except TimeoutError:
                pass  # what did not arrive is counted as missing
            arrivals = [s.arrived[s.texts.index(text)] if text in s.texts else None for s in live]
            last = max((a for a in arrivals if a is not None), default=sent)
            fanout.wall.append((last - sent) / 1e9)
            fanout.server_cpu.append(cpu_seconds(server_pid) - server_before)
            fanout.client_cpu.append(cpu_seconds(client) - client_before)
            fanout.add(*delivery_times(sent, arrivals))
            await asyncio.sleep(0.5)  # the next round starts from quiet queues
        return fanout

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams))
        for channel in self.channels:
            await channel.close()


@contextmanager
def _client_collector_held_off() -> Iterator[None]:
    """This process (the client) collects garbage less often: holding all the streams, each
    of its full collections would delay every arrival (~0.1 s at 10,000 streams), which 10,000
    real clients would not."""
    thresholds = gc.get_threshold()
    gc.set_threshold(CLIENT_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.collect()


def _ends(what: str, ended: Counter[str]) -> str:
    return f"ended {what}: " + ", ".join(f"{n} {code}" for code, n in sorted(ended.items()))


@dataclass
class _Measured:
    memory: Row
    fanout: Fanout
    notes: list[str]


async def _measure_parley(
    address: str, metrics: str, pid: int, token: str, sender_token: str, count: int, rounds: int
) -> _Measured:
    room = f"idle-{uuid.uuid4().hex[:8]}"
    metadata = (("authorization", f"Bearer {token}"), (ROOM_KEY, room))

    async def server_count() -> float:
        return await asyncio.to_thread(_open_streams, metrics)

    last = [0.0]  # the replica's latest count, for the message when a wait times out

    def reaches(value: int) -> Callable[[], Awaitable[bool]]:
        async def reached() -> bool:
            last[0] = await server_count()
            return last[0] == value

        return reached

    async def wait_for_count(value: int, what: str) -> None:
        try:
            await wait_until(reaches(value), 60, what)
        except TimeoutError:
            raise TimeoutError(f"{what}: the replica counts {last[0]:.0f}, not {value}") from None

    warm = Crowd(address, STREAM_CHAT, metadata, max(10, count // 10))
    try:
        await warm.open()
        await wait_for_count(len(warm.streams), "the warm-up streams to open")
    finally:
        await warm.close()
    await wait_for_count(0, "the warm-up streams to close")
    await asyncio.sleep(0.5)
    before = rss_bytes(pid)

    crowd = Crowd(address, STREAM_CHAT, metadata, count)
    sender_channel = grpc.aio.insecure_channel(address)
    sender_metadata = (("authorization", f"Bearer {sender_token}"), (ROOM_KEY, room))
    try:
        await crowd.open()

        async def settled() -> bool:
            return await server_count() + sum(crowd.ended().values()) >= count

        await wait_until(settled, 120, f"{count} streams to open")
        await asyncio.sleep(0.5)
        open_now = int(await server_count())
        after = rss_bytes(pid)
        ended_opening = crowd.ended()

        sender = Listening(sender_channel, sender_metadata)
        try:
            await sender.opened()
            await asyncio.sleep(1.0)  # idle for a moment
            ended_idle = crowd.ended() - ended_opening
            fanout = await crowd.send_rounds(sender, rounds, "to-everyone", pid)
        finally:
            await sender.close()
        ended_listening = crowd.ended() - ended_opening - ended_idle
    finally:
        await crowd.close()
        await sender_channel.close()
    await wait_for_count(0, "every stream to close on the server")

    per_stream = (after - before) / open_now if open_now else 0.0
    notes = [
        f"RSS {before / 2**20:.1f} → {after / 2**20:.1f} MiB with {open_now:,} of {count:,} "
        f"streams open ({len(crowd.channels)} connections, open after {crowd.opening:.1f} s)"
    ]
    for what, ended in (
        ("while opening", ended_opening),
        ("while idle", ended_idle),
        ("while listening", ended_listening),
    ):
        if ended:
            notes.append(_ends(what, ended))
    memory = Row(
        name=f"server memory per idle chat stream ({count:,} streams, one replica)",
        throughput=per_stream / 1000,
        unit="kB/stream",
        target="≤ 30 kB per stream",
        passed=per_stream <= TARGET_BYTES if open_now else None,
        notes="; ".join(notes),
        broken=open_now == 0,
        details={
            "rss_before": before,
            "rss_after": after,
            "streams": count,
            "open": open_now,
            "connections": len(crowd.channels),
            "opening_seconds": crowd.opening,
            "ended_opening": dict(ended_opening),
            "ended_idle": dict(ended_idle),
            "ended_listening": dict(ended_listening),
            "bytes_per_stream": per_stream,
        },
    )
    return _Measured(memory, fanout, notes[1:])


@dataclass
class _Baseline:
    fanout: Fanout
    bytes_per_stream: float
    notes: list[str]


async def _measure_broadcast(address: str, pid: int, count: int, rounds: int) -> _Baseline:
    warm = Crowd(address, BROADCAST_METHOD, (), max(10, count // 10))
    try:
        await warm.open()
    finally:
        await warm.close()
    await asyncio.sleep(1.0)  # the server has seen every warm-up stream end
    before = rss_bytes(pid)
    crowd = Crowd(address, BROADCAST_METHOD, (), count)
    sender_channel = grpc.aio.insecure_channel(address)
    try:
        await crowd.open()
        await asyncio.sleep(0.5)
        after = rss_bytes(pid)
        ended_opening = crowd.ended()
        sender = Listening(sender_channel, (), BROADCAST_METHOD)
        try:
            await sender.opened()
            await asyncio.sleep(1.0)
            fanout = await crowd.send_rounds(sender, rounds, "to-everyone", pid)
        finally:
            await sender.close()
        ended_later = crowd.ended() - ended_opening
    finally:
        await crowd.close()
        await sender_channel.close()
    opened = count - sum(ended_opening.values())
    notes = [
        f"RSS {before / 2**20:.1f} → {after / 2**20:.1f} MiB with {opened:,} streams open "
        f"({len(crowd.channels)} connections, open after {crowd.opening:.1f} s)"
    ]
    if ended_opening:
        notes.append(_ends("while opening", ended_opening))
    if ended_later:
        notes.append(_ends("while listening", ended_later))
    return _Baseline(fanout, (after - before) / opened if opened else 0.0, notes)


def _fanout_notes(fanout: Fanout, rounds: int) -> str:
    def each(values: list[float]) -> str:
        return ", ".join(f"{v * 1000:.0f}" for v in values)

    note = (
        f"{rounds} messages, one at a time; each one's p99: {each(fanout.round_p99)} ms; "
        f"send to last arrival {each(fanout.wall)} ms, in which the server used "
        f"{each(fanout.server_cpu)} ms of CPU and the client {each(fanout.client_cpu)} ms"
    )
    if fanout.missing:
        note += f"; {fanout.missing} deliveries never arrived"
    return note


def measure_idle(target: Target, plan: Plan, report: Report) -> None:
    pid, metrics = target.chat_pid(0), target.chat_metrics(0)
    count = plan.idle_streams
    name = f"server memory per idle chat stream ({count:,} streams, one replica)"
    if pid is None or metrics is None:
        report.add(Row(name=name, notes="skipped: needs a stack started by the harness"))
        return
    channels = math.ceil(count / STREAMS_PER_CONNECTION)
    soft_before, soft_after = raise_open_files(4 * channels + 1024)
    token, senders = chat_tokens(target, 1)
    rounds = ROUNDS
    with start_broadcast_server() as broadcast, _client_collector_held_off():
        baseline = asyncio.run(_measure_broadcast(broadcast.address, broadcast.pid, count, rounds))
    base = baseline.fanout
    report.add(
        Row(
            name=f"baseline: bare grpc.aio broadcast, {count:,} idle streams: memory, and "
            "one message to all",
            throughput=baseline.bytes_per_stream / 1000,
            unit="kB/stream",
            p50=base.p50 or None,
            p99=base.p99 or None,
            ratio=1.0,
            ratio_basis="itself",
            notes="; ".join([_fanout_notes(base, rounds), *baseline.notes]),
            broken=not base.times,
            details=dict(base.summary(), bytes_per_stream=baseline.bytes_per_stream),
        )
    )
    with _client_collector_held_off():
        parley = asyncio.run(
            _measure_parley(target.chats[0], metrics, pid, token, senders[0], count, rounds)
        )
    if soft_after != soft_before:
        parley.memory.notes += (
            f"; this process's open-file limit raised {soft_before} → {soft_after}"
        )
    if baseline.bytes_per_stream > 0 and parley.memory.throughput:
        parley.memory.ratio = parley.memory.throughput * 1000 / baseline.bytes_per_stream
        parley.memory.ratio_basis = "kB/stream vs bare grpc.aio's"
    report.add(parley.memory)
    fanout = parley.fanout
    row = Row(
        name=f"chat, one message to {count:,} idle streams on one replica",
        p50=fanout.p50 or None,
        p99=fanout.p99 or None,
        target="p99 < 1 s",
        passed=fanout.p99 < TARGET_P99 if fanout.times else None,
        notes="; ".join([_fanout_notes(fanout, rounds), *parley.notes]),
        broken=not fanout.times,
        details=fanout.summary(),
    )
    if base.p99 > 0 and fanout.times:
        row.ratio, row.ratio_basis = fanout.p99 / base.p99, "p99 vs broadcast's"
    report.add(row)
