"""ChatService's per-user limits on real `parley-chat serve` processes with small settings:
streams one user may hold open on a replica (PARLEY_CHAT_MAX_STREAMS_PER_USER) and the
messages a second one user may send across all of their streams (PARLEY_CHAT_RATE_LIMIT /
PARLEY_CHAT_RATE_BURST). Each refusal is RESOURCE_EXHAUSTED naming its setting, leaves the
user's other streams and everyone else alone, and is counted in
`parley_limit_refusals_total{limit}`.
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
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer, rich_error, sample_key, scrape_metrics, wait_until

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
STREAMS_LIMIT = 3
RATE = 10
BURST = 10
FLOOD_STREAMS = 4
FLOOD_SECONDS = 2.5


def _refusals(server: Any, limit: str) -> float | None:
    samples = scrape_metrics(server.metrics_port)
    return samples.get(sample_key("parley_limit_refusals_total", limit=limit))


def _streams(server: Any) -> float:
    return scrape_metrics(server.metrics_port)["parley_chat_streams"]


def _channel(server: Any, tag: str) -> grpc.aio.Channel:
    # A channel argument of its own, so that no two test channels share a connection.
    return grpc.aio.insecure_channel(server.target, options=[("parley.test.channel", tag)])


def _room() -> str:
    return f"lim-{uuid.uuid4().hex[:12]}"


class Listener:
    """A StreamChat call in a room, recording the texts that arrive and how it ended."""

    def __init__(self, channel: grpc.aio.Channel, token: str, room: str) -> None:
        self.call: Any = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(
            metadata=[*bearer(token), (ROOM_KEY, room)], timeout=60
        )
        self.texts: list[str] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = False
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.texts.append(message.text)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended = True

    async def refused(self) -> Any:
        """The status the server ended this call with (it must end, with an error)."""
        await wait_until(lambda: self.ended, 15, "the stream to end")
        assert self.error is not None, "the stream ended without an error"
        return rich_error(self.error)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_user_beyond_the_stream_limit_is_refused_and_the_others_keep_working(
    stack: Any, serve: Callable[..., Any], token: Callable[..., str]
) -> None:
    limit = str(STREAMS_LIMIT)
    server = serve("chat", PARLEY_CHAT_MAX_STREAMS_PER_USER=limit)
    other_replica = serve("chat", PARLEY_CHAT_MAX_STREAMS_PER_USER=limit)
    # Both series exist from the start, so a dashboard's rate() sees the first refusal.
    assert _refusals(server, "chat_streams_per_user") == 0
    assert _refusals(server, "chat_send_rate") == 0
    ada = stack.create_user("Ada Streams")
    grace = stack.create_user("Grace Streams")
    ada_token, grace_token = token(str(ada.id)), token(str(grace.id))
    room = _room()
    listeners: list[Listener] = []
    channel, elsewhere = _channel(server, "a"), _channel(other_replica, "b")
    try:
        held = [Listener(channel, ada_token, room) for _ in range(STREAMS_LIMIT)]
        listeners += held
        await wait_until(lambda: _streams(server) == STREAMS_LIMIT, 15, "Ada's streams to open")

        extra = Listener(channel, ada_token, room)
        listeners.append(extra)
        error = await extra.refused()
        assert error.code == RESOURCE_EXHAUSTED
        assert error.message.endswith(f"(limit PARLEY_CHAT_MAX_STREAMS_PER_USER={limit})")
        assert error.metadata["limit"] == "chat_streams_per_user"
        assert _refusals(server, "chat_streams_per_user") == 1

        # Ada's other streams, and Grace, are not affected.
        grace_stream = Listener(channel, grace_token, room)
        listeners.append(grace_stream)
        await wait_until(lambda: _streams(server) == STREAMS_LIMIT + 1, 15, "Grace's stream")
        await held[0].call.write(chat_pb2.ChatMessage(text="still here"))
        await wait_until(
            lambda: all(s.texts == ["still here"] for s in [*held, grace_stream]),
            15,
            "the message on every stream",
        )
        assert not any(s.ended for s in [*held, grace_stream])

        # The limit holds per replica: another replica lets Ada in.
        there = Listener(elsewhere, ada_token, room)
        listeners.append(there)
        await wait_until(lambda: _streams(other_replica) == 1, 15, "Ada on another replica")

        # An ended stream gives its place back.
        await held[0].close()
        await wait_until(lambda: _streams(server) == STREAMS_LIMIT, 15, "a stream to close")
        again = Listener(channel, ada_token, room)
        listeners.append(again)
        await wait_until(lambda: _streams(server) == STREAMS_LIMIT + 1, 15, "a new stream")
        assert not again.ended
        assert _refusals(server, "chat_streams_per_user") == 1
    finally:
        await asyncio.gather(*(s.close() for s in listeners))
        await channel.close()
        await elsewhere.close()
    assert server.alive(), server.log_text()


async def _echo(call: Any, client_id: str) -> None:
    """Reads `call` until the echo of the message sent with `client_id`."""
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF, "the stream ended without a status"
        if message.client_message_id == client_id:
            return


class Flood:
    """One of a user's streams sending as fast as the server acknowledges: one message in
    flight (so a refusal is read, not raced by a write), a new stream after each refusal."""

    def __init__(self, channel: grpc.aio.Channel, token: str, room: str, name: str) -> None:
        self._stub: Any = chat_pb2_grpc.ChatServiceStub(channel)
        self._metadata = [*bearer(token), (ROOM_KEY, room)]
        self._name = name
        self.attempts = 0
        self.refusals: list[Any] = []

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            call = self._stub.StreamChat(metadata=self._metadata, timeout=30)
            try:
                while time.monotonic() < until:
                    client_id = f"{self._name}-{self.attempts}"
                    self.attempts += 1
                    await call.write(
                        chat_pb2.ChatMessage(text="flood", client_message_id=client_id)
                    )
                    await _echo(call, client_id)
            except grpc.aio.AioRpcError as error:
                if error.code() != RESOURCE_EXHAUSTED:
                    raise
                self.refusals.append(rich_error(error))
            finally:
                call.cancel()


@pytest.mark.timeout(120)
async def test_a_users_sends_are_limited_across_all_of_their_streams(
    stack: Any, serve: Callable[..., Any], token: Callable[..., str]
) -> None:
    server = serve(
        "chat",
        PARLEY_CHAT_RATE_LIMIT=str(RATE),
        PARLEY_CHAT_RATE_BURST=str(BURST),
    )
    # New users: nothing they sent before counts against this test's budget.
    flooder = stack.create_user("Flood Gate")
    calm = stack.create_user("Calm Talker")
    room = _room()
    channel = _channel(server, "flood")
    calm_channel = _channel(server, "calm")
    try:
        floods = [
            Flood(channel, token(str(flooder.id)), room, f"f{i}") for i in range(FLOOD_STREAMS)
        ]
        until = time.monotonic() + FLOOD_SECONDS
        flooding = [asyncio.create_task(flood.run(until)) for flood in floods]

        # Another user, sending within the burst meanwhile, is never refused.
        calm_stub: Any = chat_pb2_grpc.ChatServiceStub(calm_channel)
        calm_call = calm_stub.StreamChat(
            metadata=[*bearer(token(str(calm.id))), (ROOM_KEY, room)], timeout=30
        )
        for i in range(BURST):
            await calm_call.write(chat_pb2.ChatMessage(text="calm", client_message_id=f"c{i}"))
            await _echo(calm_call, f"c{i}")
        calm_call.cancel()
        await asyncio.gather(*flooding)
    finally:
        await channel.close()
        await calm_channel.close()

    rows = stack.sql(
        "SELECT count(*), extract(epoch FROM max(create_time) - min(create_time))"
        " FROM chat_messages WHERE room = %s AND user_id = %s",
        room,
        flooder.id,
    )
    stored, span = int(rows[0][0]), float(rows[0][1] or 0)
    attempts = sum(flood.attempts for flood in floods)
    refusals = [error for flood in floods for error in flood.refusals]
    print(
        f"\n{FLOOD_STREAMS} streams of one user, {attempts} sends in {FLOOD_SECONDS}s: "
        f"{stored} stored over {span:.2f}s, {len(refusals)} refused"
    )
    # The budget's clock is Postgres' now(), the stored create_time: the bound is exact (one
    # more for the microsecond rounding of 1/rate).
    assert BURST <= stored <= BURST + RATE * span + 1, (stored, span)
    assert attempts > 2 * stored, "the flood never went beyond the limit"
    assert refusals, "no stream was refused"
    for error in refusals:
        assert error.reason == "RATE_LIMITED"
        assert error.metadata["limit"] == "chat_send_rate"
        assert error.message.endswith(f"(limit PARLEY_CHAT_RATE_LIMIT={RATE})")
    assert _refusals(server, "chat_send_rate") == len(refusals)
    calm_rows = stack.sql(
        "SELECT client_message_id FROM chat_messages WHERE room = %s AND user_id = %s"
        " ORDER BY sequence",
        room,
        calm.id,
    )
    assert [row[0] for row in calm_rows] == [f"c{i}" for i in range(BURST)]
    assert server.alive(), server.log_text()
