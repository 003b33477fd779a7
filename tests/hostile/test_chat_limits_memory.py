"""Streams that never read, each replaying a long history, hold bounded server memory.

500 StreamChat calls resume from 0 in a room of 2,000 stored messages of 4 KiB, on one real
`parley-chat serve`, and read only their first message. Each one's catch-up stops when the
client's HTTP/2 window is full (BDP probing is off, so the window stays at 64 KiB), with the
page it read from Postgres in hand: that page is what a stalled catch-up holds, so it is cut
at 64 KiB of text. Then 300 live messages (more than a stream's queue) go to the room, which
must not add a copy per stream. The server's resident memory may grow by at most MEMORY_BOUND.

Measured on a 2-core VM: +43-45 MiB for the 500 streams (~89 KiB each: the page of up to 68 KiB
of text as messages, the call itself ~25 KiB), +48-50 MiB after the live messages; with the
former pages of 200 messages and no byte cut, +489 MiB (~1 MiB each).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import MAX_TEXT_BYTES, RESUME_KEY, ROOM_KEY
from parley.testing import bearer, rss_bytes, sample_key, scrape_metrics, wait_until

STREAMS = 500
LIVE = 300  # more than PARLEY_CHAT_QUEUE_LIMIT (256): every stalled stream's queue overflows
CHANNELS = 5  # 100 calls each, under the 200 a connection may hold
HISTORY = 2000
TEXT_BYTES = MAX_TEXT_BYTES
# 500 x 192 KiB: room for the page (up to 68 KiB of text, ~75 KiB as messages), one message
# on its way out, the call's own state (~25 KiB idle) and allocator slack; a page of 200
# messages (800 KiB of text) per stream is far beyond it.
MEMORY_BOUND = STREAMS * 192 * 1024
QUIET_FOR = 2.0  # seconds without a message written: every catch-up has stalled


def fill_room(stack: Any, room: str) -> None:
    """HISTORY messages of TEXT_BYTES each, written straight into Postgres."""
    stack.sql(
        "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s) RETURNING 1", room, HISTORY
    )
    stack.sql(
        "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
        " SELECT %s, n, %s, %s, left(repeat(md5(n::text), 129), %s)"
        " FROM generate_series(1, %s) AS n RETURNING 1",
        room,
        stack.chatter_id,
        stack.chatter_name,
        TEXT_BYTES,
        HISTORY,
    )


def written(port: int) -> float:
    """Messages the server has written to StreamChat calls so far."""
    samples = scrape_metrics(port)
    return samples.get(sample_key("parley_chat_messages_delivered_total"), 0.0)


class Stalled:
    """A StreamChat call resuming from 0; the test reads what it wants of it, then nothing."""

    def __init__(self, channel: grpc.aio.Channel, token: str, room: str) -> None:
        metadata = [*bearer(token), (ROOM_KEY, room), (RESUME_KEY, "0")]
        self.call: Any = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(
            metadata=metadata, timeout=300
        )

    async def next(self) -> int:
        """The sequence of the next message."""
        message = await self.call.read()
        assert message is not grpc.aio.EOF, "the stream ended"
        return int(message.sequence)


@pytest.mark.timeout(300)
async def test_stalled_catch_ups_hold_bounded_memory(stack: Any, serve: Callable[..., Any]) -> None:
    server = serve(
        "chat",
        PARLEY_CHAT_MAX_STREAMS_PER_USER=str(STREAMS + 10),
        PARLEY_CHAT_RATE_LIMIT="100000",
        PARLEY_CHAT_RATE_BURST="100000",
    )
    room = f"mem-{uuid.uuid4().hex[:12]}"
    fill_room(stack, room)
    options = [("grpc.http2.bdp_probe", 0)]
    channels = [
        grpc.aio.insecure_channel(server.target, options=[*options, ("parley.test.channel", i)])
        for i in range(CHANNELS)
    ]
    try:
        # Warm-up: one catch-up read to the end, so pools and prepared statements exist.
        warm = Stalled(channels[0], stack.chatter_token, room)
        seen = 0
        while seen < HISTORY:
            seen = await warm.next()
        warm.call.cancel()
        await wait_until(
            lambda: scrape_metrics(server.metrics_port)["parley_chat_streams"] == 0,
            30,
            "the warm-up stream to close",
        )
        baseline = rss_bytes(server.pid)

        crowd = [Stalled(channels[i % CHANNELS], stack.chatter_token, room) for i in range(STREAMS)]
        firsts = await asyncio.wait_for(asyncio.gather(*(s.next() for s in crowd)), 120)
        assert firsts == [1] * STREAMS

        # Scraped at most 4 times a second: a scrape is work for the server too.
        last = {"value": written(server.metrics_port), "changed": time.monotonic()}
        last["scraped"] = last["changed"]

        def quiet() -> bool:
            now = time.monotonic()
            if now - last["scraped"] >= 0.25:
                last["scraped"] = now
                value = written(server.metrics_port)
                if value != last["value"]:
                    last["value"], last["changed"] = value, now
            return now - last["changed"] >= QUIET_FOR

        await wait_until(quiet, 120, "the stalled streams' catch-ups to stop writing")
        stalled_growth = rss_bytes(server.pid) - baseline
        written_stalled = int(last["value"]) - HISTORY

        # Live messages for the room: each stalled stream's queue fills, overflows and is
        # dropped (the stream will catch up from Postgres), holding no copies of its own.
        sender: Any = chat_pb2_grpc.ChatServiceStub(channels[0]).StreamChat(
            metadata=[*bearer(stack.chatter_token), (ROOM_KEY, room)], timeout=120
        )
        text = "y" * TEXT_BYTES
        for i in range(LIVE):
            await sender.write(chat_pb2.ChatMessage(text=text, client_message_id=f"live-{i}"))
        echoes = 0
        while echoes < LIVE:
            message = await sender.read()
            assert message is not grpc.aio.EOF, "the sender's stream ended"
            echoes += 1
        sender.cancel()
        last["changed"] = time.monotonic()
        await wait_until(quiet, 120, "the server to stop writing after the live messages")
        growth = rss_bytes(server.pid) - baseline
        print(
            f"\n{STREAMS} stalled catch-ups: server RSS +{stalled_growth / 2**20:.1f} MiB "
            f"({stalled_growth / STREAMS / 1024:.0f} KiB a stream), {written_stalled} messages "
            f"written; after {LIVE} live messages +{growth / 2**20:.1f} MiB"
        )
        # Every stream is stalled, far from the end of the room.
        assert int(last["value"]) - HISTORY - LIVE < STREAMS * HISTORY // 4
        assert growth < MEMORY_BOUND, (
            f"{STREAMS} stalled catch-ups grew the server by {growth / 2**20:.1f} MiB "
            f"(bound {MEMORY_BOUND / 2**20:.0f} MiB; {stalled_growth / 2**20:.1f} MiB "
            "before the live messages)"
        )
        for stalled in crowd:
            stalled.call.cancel()
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    assert server.alive(), server.log_text()
