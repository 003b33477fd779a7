"""Chat delivery latency: a listener on another replica (the message crosses Redis) against a
listener on the sender's own replica, and a room of many listeners against a room of one.

One run starts UserService and two ChatService replicas as processes (the `make run` stack,
against the machine's Postgres in a database of its own and its Redis under a key prefix of
its own). Every message is timed from the sender's write to each listener's read, in this one
process, and each result is a ratio to the baseline measured in the same run.

Measured here (2 cores): the other replica 1.0-1.2x the baseline of about 4 ms; 50 listeners
on each replica about 2.8x on the sender's replica and 2.9-3.1x on the other. Before the
sending replica published to Redis ahead of its own fan-out, the other replica's crowd
measured 4.2-4.8x: it waited for the sender's replica to wake its 50 local streams first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc

from parley.devstack.ports import free_ports
from parley.devstack.stack import Endpoints, Ports, Stack, StackConfig, unique_redis_prefix
from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.testing import DatabaseFactory

REDIS_URL = os.environ.get("PARLEY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MESSAGES = int(os.environ.get("PARLEY_BENCH_MESSAGES", "200"))
WARM_UP = 20
CROWD = 50  # listeners per replica in the crowded room
TIMEOUT = 30.0


class Listener:
    """A StreamChat call that records when each message (by text) arrived."""

    def __init__(self, channel: grpc.aio.Channel, token: str, room: str) -> None:
        metadata = [("authorization", f"Bearer {token}"), ("x-chat-room", room)]
        self.call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(metadata=metadata)
        self.arrivals: dict[str, float] = {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            self.arrivals[message.text] = time.perf_counter()

    def close(self) -> None:
        self.call.cancel()


async def _joined(listeners: Sequence[Listener], sender: Listener, room_probe: str) -> None:
    """Sends probes until every listener has seen one: then all are in the room."""
    async with asyncio.timeout(TIMEOUT):
        for n in range(1000):
            text = f"{room_probe} {n}"
            await sender.call.write(chat_pb2.ChatMessage(text=text))
            await asyncio.sleep(0.05)
            if all(text in listener.arrivals for listener in listeners):
                return
    raise TimeoutError("listeners did not join")


async def _latencies(
    sender: Listener, groups: dict[str, list[Listener]], count: int, tag: str
) -> dict[str, list[float]]:
    """Sends `count` messages one at a time, each once every listener has the one before;
    returns each group's per-message median latency in seconds."""
    everyone = [listener for group in groups.values() for listener in group]
    results: dict[str, list[float]] = {name: [] for name in groups}
    for i in range(count):
        text = f"{tag} {i}"
        sent = time.perf_counter()
        await sender.call.write(chat_pb2.ChatMessage(text=text))
        async with asyncio.timeout(TIMEOUT):
            while not all(text in listener.arrivals for listener in everyone):
                await asyncio.sleep(0.0005)
        for name, group in groups.items():
            results[name].append(statistics.median(g.arrivals[text] - sent for g in group))
    return results


async def _people(endpoints: Endpoints) -> list[str]:
    """Creates two users and returns a token for each."""
    admin = [("authorization", f"Bearer {endpoints.token('1', ('users:write',))}")]
    tokens = []
    async with grpc.aio.insecure_channel(endpoints.user) as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for name in ("Sender", "Listener"):
            reply = await stub.CreateUser(
                user_pb2.CreateUserRequest(
                    name=name, email=f"{name.lower()}.{uuid.uuid4().hex[:8]}@example.com"
                ),
                metadata=admin,
                timeout=10,
            )
            tokens.append(endpoints.token(str(reply.user.id)))
    return tokens


async def measure(endpoints: Endpoints) -> None:
    sender_token, listener_token = await _people(endpoints)
    async with (
        grpc.aio.insecure_channel(endpoints.chat) as near,
        grpc.aio.insecure_channel(endpoints.chat2) as far,
    ):
        # One listener per replica; the sender is on the first replica.
        room = f"bench-{uuid.uuid4().hex[:8]}"
        sender = Listener(near, sender_token, room)
        same, other = Listener(near, listener_token, room), Listener(far, listener_token, room)
        await _joined([same, other], sender, "join")
        await _latencies(sender, {"same": [same], "other": [other]}, WARM_UP, "warm")
        pair = await _latencies(sender, {"same": [same], "other": [other]}, MESSAGES, "pair")

        # A crowded room: CROWD listeners on each replica.
        crowded = f"bench-{uuid.uuid4().hex[:8]}"
        loud = Listener(near, sender_token, crowded)
        crowd = [Listener(c, listener_token, crowded) for c in (near, far) for _ in range(CROWD)]
        await _joined(crowd, loud, "join")
        groups = {"same": crowd[:CROWD], "other": crowd[CROWD:]}
        await _latencies(loud, groups, WARM_UP, "warm")
        many = await _latencies(loud, groups, MESSAGES, "many")
        for listener in [sender, same, other, loud, *crowd]:
            listener.close()

    baseline = statistics.median(pair["same"])

    def row(label: str, samples: list[float]) -> None:
        value = statistics.median(samples)
        print(f"  {label:<44} {value * 1000:7.2f} ms  {value / baseline:5.2f}x")

    print(f"StreamChat delivery, median of {MESSAGES} messages, sent one at a time")
    row("listener on the sender's replica (baseline)", pair["same"])
    row("listener on the other replica (via Redis)", pair["other"])
    row(f"{CROWD} listeners on each replica: same replica", many["same"])
    row(f"{CROWD} listeners on each replica: other replica", many["other"])


def main() -> None:
    databases = DatabaseFactory("parley_bench_chat", ahead=0)
    data_dir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    environ = {
        **os.environ,
        "PARLEY_DATABASE_URL": databases.take(prepared=False),
        "PARLEY_REDIS_URL": REDIS_URL,
        "PARLEY_LOG_LEVEL": "WARNING",
        # The benchmark sends faster than a person: lift the per-stream rate limit.
        "PARLEY_CHAT_RATE_LIMIT": "100000",
        "PARLEY_CHAT_RATE_BURST": "100000",
    }
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            ports=Ports(*free_ports(8)),
            environ=environ,
            durable=False,
            redis_prefix=unique_redis_prefix(),
        )
    )
    try:
        asyncio.run(measure(stack.start()))
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        databases.close()


if __name__ == "__main__":
    main()
