"""What a chat replica spends on rooms it does not serve: its CPU per 1,000 messages of
rooms where it has no stream, against its CPU per 1,000 messages of a room where it has one
listener, both measured in the same run from the process's own CPU counters.

Replica B (the second) holds one listening stream in a room of its own. Senders on replica A
(the first) send the same number of messages twice: first into B's room (B receives each
from Redis, reads it from Postgres and writes it to its listener), then spread over rooms
where B has no stream. B's idle CPU, measured over a quiet window before, is taken out of
both. A replica that subscribed to every room's channel received, parsed and dropped the
second kind too; with per-room subscriptions it never receives them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from parley.bench.chat import chat_tokens
from parley.bench.idle import Listening, wait_until
from parley.bench.plan import Plan
from parley.bench.procfs import cpu_seconds
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import chat_pb2
from parley.proto.contract import ROOM_KEY

__all__ = ["measure_foreign_rooms"]

SENDERS = 8  # sender streams on replica A (within the default streams-per-user limit)
TARGET_RATIO = 0.05


class _Phase:
    """B's CPU and the wall time over one batch of messages."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu = 0.0
        self.wall = 0.0

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        cpu, wall = cpu_seconds(self.pid), time.monotonic()
        await work()
        self.cpu, self.wall = cpu_seconds(self.pid) - cpu, time.monotonic() - wall


async def _measure(target: Target, pid: int, count: int, quiet: float) -> Row:
    listener_token, sender_tokens = chat_tokens(target, 1)
    sender_token = sender_tokens[0]
    served = f"served-{uuid.uuid4().hex[:8]}"
    foreign = [f"foreign-{uuid.uuid4().hex[:8]}-{i}" for i in range(SENDERS)]
    to_a = grpc.aio.insecure_channel(target.chats[0])
    to_b = grpc.aio.insecure_channel(target.chats[1])

    def metadata(token: str, room: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"), (ROOM_KEY, room))

    listener = Listening(to_b, metadata(listener_token, served))
    streams: list[Listening] = [listener]
    try:

        async def send(
            senders: list[Listening], texts: list[list[str]], heard: Callable[[], bool]
        ) -> None:
            async def one(sender: Listening, own: list[str]) -> None:
                for text in own:
                    await sender.call.write(chat_pb2.ChatMessage(text=text))

            await asyncio.gather(*(one(s, t) for s, t in zip(senders, texts, strict=True)))
            await wait_until(heard, 120, "every message to be stored and delivered", 0.05)

        def batch(tag: str) -> list[list[str]]:
            per = count // SENDERS
            return [[f"{tag} {s} {i}" for i in range(per)] for s in range(SENDERS)]

        # Warm-up: the room opens on both replicas, the pools and caches fill.
        warm_senders = [Listening(to_a, metadata(sender_token, served)) for _ in range(SENDERS)]
        streams += warm_senders
        warm = batch("warm")
        await send(warm_senders, warm, lambda: len(listener.texts) >= sum(map(len, warm)))

        idle_cpu, idle_wall = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(quiet)  # B's idle CPU: its timers, probes and checks
        idle_rate = (cpu_seconds(pid) - idle_cpu) / (time.monotonic() - idle_wall)

        in_served = _Phase(pid)
        texts = batch("served")
        total = sum(map(len, texts))
        have = len(listener.texts)
        await in_served.run(
            lambda: send(warm_senders, texts, lambda: len(listener.texts) >= have + total)
        )

        foreign_senders = [Listening(to_a, metadata(sender_token, room)) for room in foreign]
        streams += foreign_senders
        texts = batch("foreign")

        def all_stored() -> bool:
            return all(
                len(sender.texts) >= len(own)
                for sender, own in zip(foreign_senders, texts, strict=True)
            )

        in_foreign = _Phase(pid)
        await in_foreign.run(lambda: send(foreign_senders, texts, all_stored))
        heard_foreign = len(listener.texts) - have - total
    finally:
        await asyncio.gather(*(stream.close() for stream in streams))
        await to_a.close()
        await to_b.close()

    served_cost = max(0.0, in_served.cpu - idle_rate * in_served.wall) / total * 1000
    foreign_cost = max(0.0, in_foreign.cpu - idle_rate * in_foreign.wall) / total * 1000
    ratio = foreign_cost / served_cost if served_cost else None
    return Row(
        name="chat replica CPU per 1,000 messages of rooms it does not serve",
        throughput=foreign_cost * 1000,
        unit="ms CPU/1,000 msgs",
        ratio=ratio,
        ratio_basis="CPU vs a room it serves with one listener",
        target=f"< {TARGET_RATIO:.0%} of a served room's",
        passed=None if ratio is None else ratio < TARGET_RATIO,
        notes=(
            f"{total:,} messages each way from {SENDERS} senders on the other replica; "
            f"served room: {served_cost * 1000:.0f} ms CPU per 1,000 "
            f"({in_served.cpu:.2f} s CPU over {in_served.wall:.1f} s), rooms not served: "
            f"{foreign_cost * 1000:.1f} ms per 1,000 ({in_foreign.cpu:.2f} s CPU over "
            f"{in_foreign.wall:.1f} s); idle {idle_rate * 1000:.0f} ms CPU/s taken out of both"
        ),
        broken=heard_foreign != 0,
        details={
            "messages": total,
            "served_cpu": in_served.cpu,
            "served_wall": in_served.wall,
            "foreign_cpu": in_foreign.cpu,
            "foreign_wall": in_foreign.wall,
            "idle_cpu_per_second": idle_rate,
            "listener_heard_foreign": heard_foreign,
        },
    )


def measure_foreign_rooms(target: Target, plan: Plan, report: Report) -> None:
    pid = target.chat_pid(1)
    name = "chat replica CPU per 1,000 messages of rooms it does not serve"
    if pid is None:
        report.add(Row(name=name, notes="skipped: needs a stack started by the harness"))
        return
    quiet = min(2.0, plan.duration / 2)
    report.add(asyncio.run(_measure(target, pid, plan.foreign_messages, quiet)))
