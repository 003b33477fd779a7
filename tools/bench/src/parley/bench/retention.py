"""What history retention costs the writers: the send-to-acknowledge latency of a steady send
load into a room while the retention sweeper deletes that room's large backlog in batches,
against the same load in the same room without a sweep, in the same run.

The room gets a backlog of old messages with one `INSERT ... SELECT generate_series`. One
StreamChat stream on the first replica sends RATE messages a second, paced by the clock (not
by acknowledgements, so a stalled send shows as latency, not as fewer sends); each message's
latency is from its write to its echo, which comes once it is stored. The first window is the
load alone. Then a third chat replica starts with PARLEY_CHAT_RETENTION_MAX_MESSAGES=KEEP (the
harness's replicas run with retention off): its first sweep deletes the backlog, batch by
batch, while the load goes on. The second window runs from its first deletion to the end of
that sweep, both read from its metrics. Its batch durations and rows deleted come from its
metrics too.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from parley.bench.chat import STREAM_CHAT, chat_tokens
from parley.bench.loadgen import percentile
from parley.bench.plan import Plan
from parley.bench.report import Report, Row, format_seconds
from parley.bench.scrape import metric_samples
from parley.bench.target import Target
from parley.devstack.ports import free_ports
from parley.devstack.services import Service, ServiceSpec
from parley.proto import chat_pb2
from parley.proto.contract import CHAT_SERVICE, ROOM_KEY

__all__ = ["measure_retention"]

NAME = "worst send latency while a retention batch runs"
RATE = 100.0  # messages a second into the swept room
KEEP = 1000  # messages the sweeping replica keeps per room
BATCH = 1000  # PARLEY_CHAT_RETENTION_BATCH of the sweeping replica
SWEEP_TIMEOUT = 300.0
_POLL = 0.05


@dataclass
class _Load:
    """Sends at a steady rate on one stream and times each message to its echo."""

    call: Any  # grpc.aio.StreamStreamCall of ChatMessage both ways
    sent: dict[str, float] = field(default_factory=dict)
    # (write time, seconds to the echo), in order of echo.
    acked: list[tuple[float, float]] = field(default_factory=list)
    ended: str | None = None

    async def read(self) -> None:
        try:
            async for message in self.call:
                at = self.sent.pop(message.client_message_id, None)
                if at is not None:
                    self.acked.append((at, time.perf_counter() - at))
            self.ended = "EOF"
        except grpc.aio.AioRpcError as error:
            self.ended = error.code().name

    async def send(self, stop: asyncio.Event) -> None:
        interval = 1 / RATE
        next_at = time.perf_counter()
        number = 0
        while not stop.is_set() and self.ended is None:
            number += 1
            client_id = f"bench-{number}"
            self.sent[client_id] = time.perf_counter()
            await self.call.write(
                chat_pb2.ChatMessage(text=f"steady {number}", client_message_id=client_id)
            )
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of the messages written within [start, end], sorted."""
        return sorted(latency for at, latency in self.acked if start <= at <= end)


def _seed(database_url: str, room: str, backlog: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)", (room, backlog)
        )
        conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text, create_time)"
            " SELECT %s, g, 1, 'backlog', 'an old message of the backlog, number ' || g,"
            " now() - interval '1 day' FROM generate_series(1, %s::bigint) AS g",
            (room, backlog),
        )
        conn.execute("ANALYZE chat_messages")


def _deleted(samples: dict[str, float]) -> float:
    return sum(
        value
        for key, value in samples.items()
        if key.startswith("parley_chat_retention_deleted_messages_total{")
    )


def _batch_p99(samples: dict[str, float]) -> tuple[float, float, float]:
    """(batches, mean seconds, the bucket bound under which 99% of the batches took)."""
    prefix = "parley_chat_retention_batch_duration_seconds"
    count = samples.get(f"{prefix}_count", 0.0)
    total = samples.get(f"{prefix}_sum", 0.0)
    bounds = sorted(
        (float(key.split('le="', 1)[1].split('"', 1)[0]), value)
        for key, value in samples.items()
        if key.startswith(f"{prefix}_bucket{{")
    )
    bound = next((le for le, seen in bounds if seen >= 0.99 * count), float("inf"))
    return count, (total / count if count else 0.0), bound


async def _measure(target: Target, plan: Plan, database_url: str, environ: dict[str, str]) -> Row:
    room = f"retention-{uuid.uuid4().hex[:8]}"
    backlog = plan.retention_backlog
    await asyncio.to_thread(_seed, database_url, room, backlog)
    _, senders = chat_tokens(target, 1)
    metadata = (("authorization", f"Bearer {senders[0]}"), (ROOM_KEY, room))
    channel = grpc.aio.insecure_channel(target.chats[0])
    call = channel.stream_stream(
        STREAM_CHAT,
        request_serializer=chat_pb2.ChatMessage.SerializeToString,
        response_deserializer=chat_pb2.ChatMessage.FromString,
    )(metadata=metadata)
    load = _Load(call)
    reader = asyncio.create_task(load.read())
    stop = asyncio.Event()
    sender = asyncio.create_task(load.send(stop))
    sweeper: Service | None = None
    directory = tempfile.TemporaryDirectory(prefix="parley-bench-retention-")
    try:
        await asyncio.sleep(plan.warm_up)
        base_start = time.perf_counter()
        await asyncio.sleep(plan.duration)
        base_end = time.perf_counter()

        port, metrics_port = free_ports(2)
        spec = ServiceSpec(
            "parley-chat (retention sweeper)", "parley-chat", CHAT_SERVICE, port, metrics_port
        )
        sweeper_env = {
            **environ,
            "PARLEY_CHAT_RETENTION_MAX_MESSAGES": str(KEEP),
            "PARLEY_CHAT_RETENTION_MAX_AGE": "0",
            "PARLEY_CHAT_RETENTION_INTERVAL": "0.5s",
            "PARLEY_CHAT_RETENTION_BATCH": str(BATCH),
        }
        sweeper = Service(spec, sweeper_env, log_path=Path(directory.name) / "sweeper.log")
        await asyncio.to_thread(sweeper.wait_serving, 30)
        address = spec.metrics_address
        sweep_start = sweep_end = 0.0
        deadline = time.monotonic() + SWEEP_TIMEOUT
        samples: dict[str, float] = {}
        while time.monotonic() < deadline and load.ended is None:
            samples = await asyncio.to_thread(metric_samples, address)
            now = time.perf_counter()
            if not sweep_start and _deleted(samples) > 0:
                sweep_start = now - _POLL  # it began within the last poll
            if samples.get("parley_chat_retention_last_sweep_timestamp_seconds", 0.0) > 0:
                sweep_end = now
                break
            await asyncio.sleep(_POLL)
        stop.set()
        await sender
        await asyncio.sleep(1.0)  # the last echoes
    finally:
        stop.set()
        sender.cancel()
        call.cancel()
        await asyncio.gather(sender, reader, return_exceptions=True)
        await channel.close()
        if sweeper is not None:
            await asyncio.to_thread(sweeper.stop)
        directory.cleanup()

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT min(sequence), max(sequence) FROM chat_messages WHERE room = %s", (room,)
        ).fetchone()
    kept_from, kept_to = (row or (None, None))[0], (row or (None, None))[1]
    baseline = load.window(base_start, base_end)
    name = NAME
    if not sweep_end or not sweep_start or not baseline:
        return Row(
            name=name,
            broken=True,
            notes=f"no complete sweep observed (start {sweep_start}, end {sweep_end}; "
            f"stream {load.ended or 'open'}; {len(baseline)} baseline sends)",
        )
    during = load.window(sweep_start, sweep_end)
    seconds = sweep_end - sweep_start
    deleted = _deleted(samples)
    batches, batch_mean, batch_p99 = _batch_p99(samples)
    worst_base, worst_during = baseline[-1], (during[-1] if during else 0.0)
    p99_base, p99_during = percentile(baseline, 0.99), percentile(during, 0.99)
    lost = len(load.sent)
    return Row(
        name=name,
        throughput=deleted / seconds,
        unit="rows deleted/s",
        p50=percentile(during, 0.5),
        p99=p99_during,
        ratio=worst_during / worst_base if worst_base else None,
        ratio_basis="worst send-to-ack vs the same load without a sweep",
        target="p99 ≤ 2× without a sweep",
        passed=bool(during) and p99_during <= 2 * p99_base,
        broken=not during or kept_from is None,
        notes=(
            f"{RATE:g} sends/s on one stream into a room with a backlog of {backlog:,} "
            f"messages; another replica (PARLEY_CHAT_RETENTION_MAX_MESSAGES={KEEP}, batches of "
            f"{BATCH}) deleted {deleted:,.0f} rows in {seconds:.1f} s in {batches:.0f} batches "
            f"(mean {format_seconds(batch_mean)}, 99% under {format_seconds(batch_p99)}); "
            f"send-to-ack during the sweep: worst {format_seconds(worst_during)}, "
            f"p99 {format_seconds(p99_during)}, p50 {format_seconds(percentile(during, 0.5))} "
            f"({len(during)} sends); without a sweep: worst {format_seconds(worst_base)}, "
            f"p99 {format_seconds(p99_base)}, p50 {format_seconds(percentile(baseline, 0.5))} "
            f"({len(baseline)} sends); the room keeps {kept_from}-{kept_to}"
            + (f"; {lost} sends never acknowledged" if lost else "")
        ),
        details={
            "backlog": backlog,
            "rate": RATE,
            "keep": KEEP,
            "batch": BATCH,
            "deleted": deleted,
            "sweep_seconds": seconds,
            "batches": batches,
            "batch_mean_seconds": batch_mean,
            "batch_p99_bound_seconds": batch_p99,
            "baseline": {
                "sends": len(baseline),
                "worst": worst_base,
                "p99": p99_base,
                "p50": percentile(baseline, 0.5),
            },
            "during_sweep": {
                "sends": len(during),
                "worst": worst_during,
                "p99": p99_during,
                "p50": percentile(during, 0.5),
            },
            "unacknowledged": lost,
        },
    )


def measure_retention(target: Target, plan: Plan, report: Report) -> None:
    if target.environ is None or target.endpoints is None:
        report.add(Row(name=NAME, notes="skipped: needs a stack started by the harness"))
        return
    report.add(asyncio.run(_measure(target, plan, target.endpoints.database_url, target.environ)))
