"""Chat fan-out: N listening streams and S senders in one room, against Parley's two chat
replicas and against the bare broadcast baseline, with the same client.

Listeners run in worker processes (multiprocessing 'spawn'), each with a share of the
streams; the senders run in this process. Every message's text carries its sender, a number
and the sender's clock (time.monotonic_ns, one clock for every process on Linux), so each
listener times publish-to-deliver itself. Two phases:

1. saturation: each sender keeps `window` messages unacknowledged (a message is acknowledged
   when it comes back on the sender's own stream) for warm-up + duration seconds; deliveries a
   second are the listeners' receipts inside the measured window;
2. latency: the senders together send at `load` times the saturated message rate, on a fixed
   schedule, and the listeners' publish-to-deliver times give p50 and p99, also split into
   listeners on the sender's replica and on the other one (through Redis).

Probes (messages every listener must have seen) mark when all streams have joined and when
the saturation backlog has drained, so the latency phase starts from empty queues.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from parley.bench.baseline import BROADCAST_METHOD
from parley.bench.loadgen import percentile
from parley.bench.plan import Plan
from parley.bench.report import Report, Row
from parley.bench.target import Target
from parley.proto import chat_pb2, user_pb2, user_pb2_grpc
from parley.proto.contract import CHAT_SERVICE, ROOM_KEY

__all__ = ["ChatSetup", "FanOutResult", "chat_tokens", "measure_chat", "run_fan_out"]

STREAM_CHAT = f"/{CHAT_SERVICE}/StreamChat"
PROBE_TIMEOUT = 60.0


@dataclass(frozen=True)
class ChatSetup:
    """Where the streams go and how they identify themselves."""

    addresses: tuple[str, ...]  # the replicas; stream i goes to addresses[i % len]
    method: str
    listener_metadata: tuple[tuple[str, str], ...]
    sender_metadata: tuple[tuple[tuple[str, str], ...], ...]  # one per sender


@dataclass
class _Received:
    """What one listener process received (picklable)."""

    sat_recv: bytes = b""  # array('q') of receive times, saturation phase
    sat_sent: bytes = b""  # array('q') of send times, same order
    lat_recv: bytes = b""
    lat_sent: bytes = b""
    lat_same: bytes = b""  # array('b'): 1 when the listener is on the sender's replica
    lat_count: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failure: str | None = None


@dataclass(frozen=True)
class FanOutResult:
    streams: int
    senders: int
    saturated_messages: float  # messages a second acknowledged at saturation
    saturated_deliveries: float  # deliveries a second at saturation
    saturated_p50: float
    saturated_p99: float
    load_rate: float  # messages a second offered in the latency phase
    load_deliveries: float
    p50: float
    p99: float
    same_p50: float
    same_p99: float
    other_p50: float
    other_p99: float
    missing: int  # latency-phase deliveries that never arrived
    stream_errors: dict[str, int]


def _passthrough(data: bytes) -> bytes:
    return data


def _encode(text: str) -> bytes:
    return chat_pb2.ChatMessage(text=text).SerializeToString()


async def _listen(
    index: int,
    setup: ChatSetup,
    streams: Sequence[int],
    senders: int,
    ready: Any,
    stop: Any,
    deadline: float,
) -> _Received:
    received = _Received()
    sat_recv, sat_sent = array("q"), array("q")
    lat_recv, lat_sent, lat_same = array("q"), array("q"), array("b")
    errors: Counter[str] = Counter()
    probes = dict.fromkeys(streams, 0)
    reported = 0
    channels = {address: grpc.aio.insecure_channel(address) for address in set(setup.addresses)}

    def seen_probe(stream: int, number: int) -> None:
        nonlocal reported
        probes[stream] = max(probes[stream], number)
        low = min(probes.values())
        if low > reported:
            reported = low
            ready.put((index, low))

    async def one(stream: int) -> None:
        replica = stream % len(setup.addresses)
        channel = channels[setup.addresses[replica]]
        call = channel.stream_stream(
            setup.method, request_serializer=_passthrough, response_deserializer=_passthrough
        )(metadata=setup.listener_metadata)
        ended = 0
        try:
            async for raw in call:
                now = time.monotonic_ns()
                parts = chat_pb2.ChatMessage.FromString(raw).text.split(" ")
                tag = parts[0]
                if tag == "sat":
                    sat_recv.append(now)
                    sat_sent.append(int(parts[3]))
                elif tag == "lat":
                    lat_recv.append(now)
                    lat_sent.append(int(parts[3]))
                    lat_same.append(1 if int(parts[1]) % len(setup.addresses) == replica else 0)
                elif tag == "probe":
                    seen_probe(stream, int(parts[2]))
                elif tag == "end":
                    ended += 1
                    if ended == senders:
                        break
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
        finally:
            call.cancel()

    async def watch(tasks: list[asyncio.Task[None]]) -> None:
        # Told to stop (the senders are done), or past the deadline: whatever is still open
        # never saw every sender's end message.
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in tasks:
            if not task.done():
                errors["still open at the end"] += 1
                task.cancel()

    tasks = [asyncio.create_task(one(stream)) for stream in streams]
    watcher = asyncio.create_task(watch(tasks))
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        watcher.cancel()
        for channel in channels.values():
            await channel.close()
    received.sat_recv, received.sat_sent = sat_recv.tobytes(), sat_sent.tobytes()
    received.lat_recv, received.lat_sent = lat_recv.tobytes(), lat_sent.tobytes()
    received.lat_same, received.lat_count = lat_same.tobytes(), len(lat_recv)
    received.errors = dict(errors)
    return received


def _listener(
    index: int,
    setup: ChatSetup,
    streams: Sequence[int],
    senders: int,
    queues: tuple[Any, Any, Any],
    deadline: float,
) -> None:
    ready, stop, results = queues
    try:
        received = asyncio.run(_listen(index, setup, streams, senders, ready, stop, deadline))
    except BaseException as error:  # reported to the parent, which fails the run
        received = _Received(failure=f"listener {index}: {type(error).__name__}: {error}")
    results.put((index, received))


class _Sender:
    """One sending stream; it reads its own stream to see its acknowledgements."""

    def __init__(self, number: int, setup: ChatSetup, channel: grpc.aio.Channel) -> None:
        self.number = number
        self.call = channel.stream_stream(
            setup.method, request_serializer=_passthrough, response_deserializer=_passthrough
        )(metadata=setup.sender_metadata[number])
        self.sat_sent = 0
        self.acked = 0
        self.acked_in_window = 0
        self.window: tuple[int, int] = (0, 0)
        self.progress = asyncio.Event()
        self.ended = asyncio.Event()
        self.error: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            await self._acknowledge()
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name}: {error.details()}"
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.error += (
                    " (the chat replicas rate-limit each stream: run them with "
                    "PARLEY_CHAT_RATE_LIMIT and PARLEY_CHAT_RATE_BURST raised, e.g. 100000)"
                )
        finally:
            self.progress.set()
            self.ended.set()

    def check(self) -> None:
        """Raises when the sending stream has ended."""
        if self.error is not None:
            raise RuntimeError(f"sender {self.number}'s stream ended: {self.error}")

    async def _acknowledge(self) -> None:
        mine = str(self.number)
        async for raw in self.call:
            parts = chat_pb2.ChatMessage.FromString(raw).text.split(" ")
            if parts[0] == "sat" and parts[1] == mine:
                self.acked += 1
                start, end = self.window
                if start <= time.monotonic_ns() <= end:
                    self.acked_in_window += 1
                self.progress.set()
            elif parts[0] == "end" and parts[1] == mine:
                self.ended.set()

    async def send(self, tag: str, extra: str = "0") -> None:
        if tag == "sat":
            self.sat_sent += 1
        text = f"{tag} {self.number} {extra} {time.monotonic_ns()}"
        await self.call.write(_encode(text))

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


async def _drive(
    setup: ChatSetup,
    senders_count: int,
    plan: Plan,
    listeners: int,
    ready: Any,
    alive: Any,
    offered_rate: float | None = None,
) -> tuple[dict[str, int], float, int]:
    """The senders' side; returns the phases' measured windows (monotonic ns), the saturated
    message rate and the number of latency-phase messages sent. The latency phase offers
    `offered_rate` messages a second when given, else `plan.chat_load` of the saturated rate."""
    seen = [0] * listeners
    channels = [grpc.aio.insecure_channel(address) for address in setup.addresses]
    senders = [_Sender(i, setup, channels[i % len(channels)]) for i in range(senders_count)]
    probe_number = 0

    async def all_saw_probe() -> None:
        nonlocal probe_number
        probe_number += 1
        async with asyncio.timeout(PROBE_TIMEOUT):
            while min(seen) < probe_number:
                await senders[0].send("probe", str(probe_number))
                until = time.monotonic() + 0.1
                while time.monotonic() < until and min(seen) < probe_number:
                    try:
                        while True:
                            index, number = ready.get_nowait()
                            seen[index] = max(seen[index], number)
                    except queue.Empty:
                        pass
                    if not alive():
                        raise RuntimeError("a listener process ended early")
                    for sender in senders:
                        sender.check()
                    await asyncio.sleep(0.01)

    try:
        await all_saw_probe()  # every stream has joined

        # Saturation: `window` messages in flight per sender.
        warm = int(plan.warm_up * 1e9)
        span = int(plan.duration * 1e9)
        start = time.monotonic_ns()
        window = (start + warm, start + warm + span)
        stop_at = window[1]

        async def saturate(sender: _Sender) -> None:
            sender.window = window
            while time.monotonic_ns() < stop_at:
                while sender.sat_sent - sender.acked >= plan.chat_window:
                    sender.progress.clear()
                    await asyncio.wait_for(sender.progress.wait(), 30)
                    sender.check()
                await sender.send("sat")

        await asyncio.gather(*(saturate(s) for s in senders))
        rate = sum(s.acked_in_window for s in senders) / plan.duration
        await all_saw_probe()  # the backlog has drained

        # Latency: a fixed schedule at `load` times the saturated rate.
        offered = offered_rate or max(1.0, rate * plan.chat_load)
        interval = senders_count / offered
        begin = time.monotonic_ns()
        lat_window = (begin + warm, begin + warm + span)
        sent = 0

        async def paced(sender: _Sender) -> None:
            nonlocal sent
            due = time.monotonic() + interval * sender.number / senders_count
            end = lat_window[1] / 1e9
            while due < end:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sender.check()
                await sender.send("lat")
                sent += 1
                due += interval

        await asyncio.gather(*(paced(s) for s in senders))
        await all_saw_probe()
        for sender in senders:
            await sender.send("end")
        # Closed only once the server has its end message: a cancelled stream drops it.
        await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in senders)), 30)
        for sender in senders:
            sender.check()
        windows = {
            "sat_from": window[0],
            "sat_until": window[1],
            "lat_from": lat_window[0],
            "lat_until": lat_window[1],
        }
        return windows, rate, sent
    finally:
        for sender in senders:
            sender.close()
        for channel in channels:
            await channel.close()


def _latencies(recv: array[int], sent: array[int], low: int, high: int) -> list[float]:
    return sorted((r - s) / 1e9 for r, s in zip(recv, sent, strict=True) if low <= s <= high)


def run_fan_out(setup: ChatSetup, plan: Plan, offered_rate: float | None = None) -> FanOutResult:
    """Runs both phases with `plan.chat_streams` listeners, the latency phase at
    `offered_rate` messages a second when given; raises when the harness fails."""
    senders = len(setup.sender_metadata)
    context = multiprocessing.get_context("spawn")
    ready: Any = context.Queue()
    stop: Any = context.Event()
    results: Any = context.Queue()
    count = max(1, min(plan.processes, plan.chat_streams))
    budget = 2 * (plan.warm_up + plan.duration) + 4 * PROBE_TIMEOUT
    deadline = time.monotonic() + budget
    shares = [list(range(i, plan.chat_streams, count)) for i in range(count)]
    workers = [
        context.Process(
            target=_listener,
            args=(i, setup, shares[i], senders, (ready, stop, results), deadline),
            name=f"parley-bench-listener-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    for process in workers:
        process.start()
    collected: dict[int, _Received] = {}
    try:

        def alive() -> bool:
            return all(p.is_alive() for p in workers)

        windows, rate, sent = asyncio.run(
            _drive(setup, senders, plan, count, ready, alive, offered_rate)
        )
        # Listeners end once they have every sender's end message; those that have not
        # within a few seconds are told to stop.
        stop_listeners_at = time.monotonic() + 10
        while len(collected) < count and time.monotonic() < deadline + 5:
            if time.monotonic() > stop_listeners_at:
                stop.set()
            try:
                index, received = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in workers):
                    break
                continue
            collected[index] = received
    finally:
        stop.set()
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    failures = [r.failure for r in collected.values() if r.failure]
    if len(collected) < count:
        failures.append(f"{count - len(collected)} listener process(es) did not report")
    if failures:
        raise RuntimeError("chat fan-out failed: " + "; ".join(failures))

    sat_recv, sat_sent = array("q"), array("q")
    lat_recv, lat_sent, lat_same = array("q"), array("q"), array("b")
    errors: Counter[str] = Counter()
    for received in collected.values():
        sat_recv.frombytes(received.sat_recv)
        sat_sent.frombytes(received.sat_sent)
        lat_recv.frombytes(received.lat_recv)
        lat_sent.frombytes(received.lat_sent)
        lat_same.frombytes(received.lat_same)
        errors.update(received.errors)
    s_from, s_until = windows["sat_from"], windows["sat_until"]
    l_from, l_until = windows["lat_from"], windows["lat_until"]
    delivered = sum(1 for r in sat_recv if s_from <= r <= s_until)
    delivered_load = sum(1 for r in lat_recv if l_from <= r <= l_until)
    saturated = _latencies(sat_recv, sat_sent, s_from, s_until)
    loaded = _latencies(lat_recv, lat_sent, l_from, l_until)
    same_recv = array("q", (r for r, f in zip(lat_recv, lat_same, strict=True) if f))
    same_sent = array("q", (s for s, f in zip(lat_sent, lat_same, strict=True) if f))
    other_recv = array("q", (r for r, f in zip(lat_recv, lat_same, strict=True) if not f))
    other_sent = array("q", (s for s, f in zip(lat_sent, lat_same, strict=True) if not f))
    same = _latencies(same_recv, same_sent, l_from, l_until)
    other = _latencies(other_recv, other_sent, l_from, l_until)
    return FanOutResult(
        streams=plan.chat_streams,
        senders=senders,
        saturated_messages=rate,
        saturated_deliveries=delivered / plan.duration,
        saturated_p50=percentile(saturated, 0.5),
        saturated_p99=percentile(saturated, 0.99),
        load_rate=offered_rate or max(1.0, rate * plan.chat_load),
        load_deliveries=delivered_load / plan.duration,
        p50=percentile(loaded, 0.5),
        p99=percentile(loaded, 0.99),
        same_p50=percentile(same, 0.5),
        same_p99=percentile(same, 0.99),
        other_p50=percentile(other, 0.5),
        other_p99=percentile(other, 0.99),
        missing=max(0, sent * plan.chat_streams - len(lat_recv)),
        stream_errors=dict(errors),
    )


def chat_tokens(target: Target, senders: int) -> tuple[str, list[str]]:
    """A listener's token and one token per sender, each for a user created here."""
    if not target.started:
        token = target.token("1")
        return token, [token] * senders
    admin = (("authorization", f"Bearer {target.token('1', ('users:write',))}"),)
    tokens = []
    with grpc.insecure_channel(target.user) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for name in ["Listener"] + [f"Sender {i}" for i in range(senders)]:
            reply = stub.CreateUser(
                user_pb2.CreateUserRequest(
                    name=f"Bench {name}", email=f"chat-{uuid.uuid4().hex[:10]}@bench.example"
                ),
                metadata=admin,
                timeout=10,
            )
            tokens.append(target.token(str(reply.user.id)))
    return tokens[0], tokens[1:]


def _rows(label: str, result: FanOutResult, baseline: FanOutResult | None, plan: Plan) -> list[Row]:
    notes = []
    if result.stream_errors:
        notes.append(
            "streams ended with "
            + ", ".join(f"{n} {code}" for code, n in sorted(result.stream_errors.items()))
        )
    if result.missing:
        notes.append(f"{result.missing} latency-phase deliveries never arrived")
    saturated = Row(
        name=f"{label}: deliveries at saturation",
        throughput=result.saturated_deliveries,
        unit="deliveries/s",
        p50=result.saturated_p50,
        p99=result.saturated_p99,
        notes="; ".join(
            [
                f"{result.streams} streams, {result.senders} sender(s) with "
                f"{plan.chat_window} messages in flight each: "
                f"{result.saturated_messages:,.0f} messages/s",
                *notes,
            ]
        ),
        broken=result.saturated_deliveries <= 0,
        details={"result": asdict(result)},
    )
    loaded = Row(
        name=f"{label}: publish-to-deliver at {plan.chat_load:.0%} of saturation",
        throughput=result.load_deliveries,
        unit="deliveries/s",
        p50=result.p50,
        p99=result.p99,
        notes=f"{result.load_rate:,.0f} messages/s offered on a fixed schedule",
        broken=result.p50 <= 0,
    )
    if baseline is None:
        saturated.ratio, saturated.ratio_basis = 1.0, "itself"
        return [saturated, loaded]
    if baseline.saturated_deliveries > 0:
        saturated.ratio = result.saturated_deliveries / baseline.saturated_deliveries
        saturated.ratio_basis = "deliveries/s vs broadcast"
        saturated.target = "≥ 0.5× the broadcast server's"
        saturated.passed = not saturated.broken and saturated.ratio >= 0.5
    if baseline.p99 > 0:
        loaded.ratio, loaded.ratio_basis = result.p99 / baseline.p99, "p99 vs broadcast's"
    loaded.target = "p99 < 50 ms"
    loaded.passed = not loaded.broken and result.p99 < 0.050
    split = Row(
        name=f"{label}: listeners on the other replica (through Redis)",
        p50=result.other_p50,
        p99=result.other_p99,
        ratio=result.other_p50 / result.same_p50 if result.same_p50 > 0 else None,
        ratio_basis="p50 vs the sender's replica",
        notes=(
            f"listeners on the sender's replica: p50 {result.same_p50 * 1000:.2f} ms, "
            f"p99 {result.same_p99 * 1000:.2f} ms (latency phase)"
        ),
    )
    return [saturated, loaded, split]


def measure_chat(target: Target, broadcast_address: str, plan: Plan, report: Report) -> None:
    """The broadcast baseline, then Parley's two replicas, with the same client."""
    room = f"bench-{uuid.uuid4().hex[:8]}"
    listener_token, sender_tokens = chat_tokens(target, plan.chat_senders)

    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"), (ROOM_KEY, room))

    base_setup = ChatSetup(
        addresses=(broadcast_address,),
        method=BROADCAST_METHOD,
        listener_metadata=metadata(listener_token),
        sender_metadata=tuple(metadata(t) for t in sender_tokens),
    )
    base = run_fan_out(base_setup, plan)
    label = f"chat, {plan.chat_streams} streams"
    for row in _rows(f"baseline: bare grpc.aio broadcast, {plan.chat_streams} streams", base,
                     None, plan):  # fmt: skip
        report.add(row)
    setup = ChatSetup(
        addresses=target.chats,
        method=STREAM_CHAT,
        listener_metadata=metadata(listener_token),
        sender_metadata=tuple(metadata(t) for t in sender_tokens),
    )
    result = run_fan_out(setup, plan)
    for row in _rows(f"{label} on 2 replicas", result, base, plan):
        report.add(row)
