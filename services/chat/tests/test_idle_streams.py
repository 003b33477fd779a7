"""Thousands of idle StreamChat streams on one replica: all open at once, each still live,
and what each costs in server memory.

2,000 streams join one room in a single burst (every call started before any is answered, as
when the clients of a lost replica all reconnect), on 20 channels. The test waits until the
server counts all of them, reads the server's resident memory against its level with no stream
open (after a warm-up that fills pools and allocator arenas), sends one message that every
stream must receive, then closes them all and waits for the count to reach 0 again.

With grpc's own limit on calls waiting for the server to pick them up (1,000; Parley's
PARLEY_MAX_PENDING_CALLS default is 10,000), 540 of this burst ended CANCELLED without reaching
a handler. Measured here: 24.8-25.7 KiB of server memory per idle stream; the whole test runs
in about 6 s.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import ROOM_KEY

ROOM = "idle"
STREAMS = 2000
CHANNELS = 20
WARM_UP = 200
# A loose bound that a per-stream leak or buffer (a queue of messages, a copy of the room's
# history) would break; `make bench` reports the measured figure against its 30 KB target.
PER_STREAM_BOUND = 64 * 1024


class Idle:
    """An open StreamChat call that only listens, recording what arrives and how it ends."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        metadata = [("authorization", f"Bearer {token}"), (ROOM_KEY, ROOM)]
        self.call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(metadata=metadata)
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
            self.ended = "cancelled by the test"

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.mark.timeout(240)
async def test_thousands_of_idle_streams(
    make_stack,
    channels,
    rss: Callable[[int], int],
    metrics: Callable[[int], Awaitable[dict[str, float]]],
    wait_for,
):
    stack = await make_stack(
        replicas=1,
        people=("Ada", "Grace"),
        PARLEY_CHAT_MAX_STREAMS_PER_USER="10000",
        PARLEY_MAX_STREAMS_PER_CONNECTION="10000",
    )
    replica = stack.replicas[0]
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    pool = [channels.get(replica.target, key=("idle", i)) for i in range(CHANNELS)]

    def streams_open(count: int) -> Callable[[], Awaitable[bool]]:
        async def reached() -> bool:
            return (await metrics(replica.metrics_port))["parley_chat_streams"] == count

        return reached

    # Warm-up: a smaller crowd comes and goes, so the baseline has its pools and arenas.
    warm = [Idle(pool[i % CHANNELS], ada.token) for i in range(WARM_UP)]
    await wait_for(streams_open(WARM_UP), 60, f"{WARM_UP} warm-up streams to open")
    await asyncio.gather(*(s.close() for s in warm))
    await wait_for(streams_open(0), 30, "the warm-up streams to close")
    baseline = rss(replica.pid)

    crowd = [Idle(pool[i % CHANNELS], ada.token) for i in range(STREAMS)]
    try:
        all_open = streams_open(STREAMS)

        async def opened_or_ended() -> bool:
            return any(s.ended for s in crowd) or await all_open()

        await wait_for(opened_or_ended, 120, f"{STREAMS} streams to open")
        ended = collections.Counter(s.ended for s in crowd if s.ended is not None)
        assert not ended, f"streams ended while opening: {dict(ended)}"
        loaded = rss(replica.pid)
        per_stream = (loaded - baseline) / STREAMS
        print(
            f"\n{STREAMS} idle streams: server RSS {baseline / 2**20:.1f} -> "
            f"{loaded / 2**20:.1f} MiB, {per_stream / 1024:.1f} KiB per stream"
        )
        assert per_stream < PER_STREAM_BOUND, (
            f"{per_stream / 1024:.1f} KiB of server memory per idle stream"
        )

        # Every one of them is live: one message reaches all.
        text = f"to everyone {uuid.uuid4().hex[:8]}"
        sender = Idle(pool[0], grace.token)
        await sender.call.write(chat_pb2.ChatMessage(text=text))

        def everyone_got_it() -> bool:
            return all(text in s.texts for s in crowd)

        await wait_for(everyone_got_it, 60, f"the message to reach all {STREAMS} streams")
        await sender.close()
        ended = collections.Counter(s.ended for s in crowd if s.ended is not None)
        assert not ended, f"streams ended while idle: {dict(ended)}"
    finally:
        await asyncio.gather(*(s.close() for s in crowd))
    await wait_for(streams_open(0), 60, f"all {STREAMS} streams to close on the server")
