"""Server memory per idle chat stream: one replica's resident memory with no stream open and
with N idle StreamChat streams open, once the replica itself counts all of them.

A smaller crowd comes and goes first, so the measurement with no stream has the pools and
allocator arenas a loaded server has. Streams that end while opening or idling (CANCELLED
has been seen at 2,000, and is under investigation) are counted and reported, not hidden;
the memory is divided by the streams actually open. One message sent at the end must reach
every open stream: they are live, not just open.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from parley.bench.chat import STREAM_CHAT, chat_tokens
from parley.bench.plan import Plan
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import chat_pb2
from parley.proto.contract import ROOM_KEY

__all__ = ["Listening", "measure_idle", "rss_bytes", "wait_until"]

CHANNELS = 20
TARGET_BYTES = 30_000


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from VmRSS in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _open_streams(metrics_address: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("parley_chat_streams ") or line.startswith("parley_chat_streams{"):
                return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no parley_chat_streams on {metrics_address}")


class Listening:
    """A StreamChat call that keeps the texts it receives (and may send)."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.call = channel.stream_stream(
            STREAM_CHAT,
            request_serializer=chat_pb2.ChatMessage.SerializeToString,
            response_deserializer=chat_pb2.ChatMessage.FromString,
        )(metadata=metadata)
        self.texts: list[str] = []
        self.ended: str | None = None
        self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        try:
            async for message in self.call:
                self.texts.append(message.text)
            self.ended = "EOF"
        except grpc.aio.AioRpcError as error:
            self.ended = error.code().name
        except asyncio.CancelledError:
            self.ended = self.ended or "closed"

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


async def _measure(
    address: str, metrics: str, pid: int, token: str, sender_token: str, count: int
) -> Row:
    room = f"idle-{uuid.uuid4().hex[:8]}"
    metadata = (("authorization", f"Bearer {token}"), (ROOM_KEY, room))
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]

    async def server_count() -> float:
        return await asyncio.to_thread(_open_streams, metrics)

    def reaches(value: int) -> Callable[[], Awaitable[bool]]:
        async def reached() -> bool:
            return await server_count() == value

        return reached

    try:
        warm = [Listening(channels[i % CHANNELS], metadata) for i in range(max(10, count // 10))]
        await wait_until(reaches(len(warm)), 60, "the warm-up streams to open")
        await asyncio.gather(*(s.close() for s in warm))
        await wait_until(reaches(0), 60, "the warm-up streams to close")
        await asyncio.sleep(0.5)
        before = rss_bytes(pid)

        crowd = [Listening(channels[i % CHANNELS], metadata) for i in range(count)]
        try:

            async def settled() -> bool:
                ended = sum(1 for s in crowd if s.ended is not None)
                return await server_count() + ended >= count

            started = time.monotonic()
            await wait_until(settled, 120, f"{count} streams to open")
            opening = time.monotonic() - started
            await asyncio.sleep(0.5)
            open_now = int(await server_count())
            after = rss_bytes(pid)
            ended_opening = Counter(s.ended for s in crowd if s.ended is not None)

            # Every open stream is live: one message reaches each.
            text = f"to everyone {uuid.uuid4().hex[:8]}"
            sender_metadata = (("authorization", f"Bearer {sender_token}"), (ROOM_KEY, room))
            sender = Listening(channels[0], sender_metadata)
            await sender.call.write(chat_pb2.ChatMessage(text=text))
            live = [s for s in crowd if s.ended is None]

            async def delivered() -> bool:
                return all(text in s.texts for s in live if s.ended is None)

            try:
                await wait_until(delivered, 60, "the message to reach every open stream")
            finally:
                await sender.close()
            ended_idle = Counter(s.ended for s in live if s.ended is not None)
            reached = sum(1 for s in crowd if text in s.texts)
        finally:
            await asyncio.gather(*(s.close() for s in crowd))
        await wait_until(reaches(0), 60, "every stream to close on the server")
    finally:
        for channel in channels:
            await channel.close()

    per_stream = (after - before) / open_now if open_now else 0.0
    notes = [
        f"RSS {before / 2**20:.1f} → {after / 2**20:.1f} MiB with {open_now} of {count} "
        f"streams open (all started in one burst, open after {opening:.1f} s); "
        f"one message reached {reached}"
    ]
    if ended_opening:
        notes.append(
            "ended while opening: " + ", ".join(f"{n} {c}" for c, n in ended_opening.items())
        )
    if ended_idle:
        notes.append("ended while idle: " + ", ".join(f"{n} {c}" for c, n in ended_idle.items()))
    return Row(
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
            "ended_opening": dict(ended_opening),
            "ended_idle": dict(ended_idle),
            "message_reached": reached,
            "bytes_per_stream": per_stream,
        },
    )


def measure_idle(target: Target, plan: Plan, report: Report) -> None:
    pid, metrics = target.chat_pid(0), target.chat_metrics(0)
    name = f"server memory per idle chat stream ({plan.idle_streams:,} streams, one replica)"
    if pid is None or metrics is None:
        report.add(Row(name=name, notes="skipped: needs a stack started by the harness"))
        return
    token, senders = chat_tokens(target, 1)
    report.add(
        asyncio.run(_measure(target.chats[0], metrics, pid, token, senders[0], plan.idle_streams))
    )
