"""History retention as the SDK sees it: a ChatSession that meets messages the server no longer
keeps reports a HistoryGap in their place and goes on from the first kept one, and a plain
client's error carries `first_sequence`.

The messages are stored with SQL and the front of the room deleted with SQL, as the chat
replicas' retention sweeper deletes (services/chat/tests/test_retention.py tests the sweeper).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from parley.client import (
    AsyncChatClient,
    ConnectionState,
    HistoryGap,
    OutOfRange,
    ParleyError,
    ReconnectPolicy,
)
from parley.client.errors import CallContext, error_from_rpc
from parley.proto import chat_pb2, chat_pb2_grpc
from parley.proto.contract import CHAT_SERVICE, RESUME_KEY, ROOM_KEY
from parley.testing import wait_until

if TYPE_CHECKING:
    from conftest import ExtraReplica, Person, RunningStack

INT64_MAX = 2**63 - 1


def store(url: str, room: str, first: int, last: int) -> None:
    """Messages first..last of `room` (made when missing), as a sender would have stored them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET last_sequence = excluded.last_sequence",
            (room, last),
        )
        conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " SELECT %s, g, 1, 'seed', 'message ' || g"
            " FROM generate_series(%s::bigint, %s::bigint) AS g",
            (room, first, last),
        )


def forget(url: str, room: str, through: int) -> None:
    """Deletes the room's messages up to `through`, from the front, as retention does."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM chat_messages WHERE room = %s AND sequence <= %s", (room, through)
        )


async def test_a_session_resuming_before_the_kept_history_reports_the_gap_and_goes_on(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    store(stack.database_url, room, 1, 50)
    forget(stack.database_url, room, 40)
    timeline: list[Any] = []
    async with (
        AsyncChatClient(stack.chat, token=ada.token) as chat,
        chat.session(room, resume_after=5, on_gap=timeline.append) as session,
    ):
        page = await chat.list_messages_page(room, before=INT64_MAX, page_size=5, timeout=10)
        assert (page.first_sequence, page.last_sequence) == (41, 50)
        async with asyncio.timeout(20):
            while len(timeline) < 11:
                timeline.append((await anext(session)).sequence)
        assert timeline == [HistoryGap(room, 5, 41), *range(41, 51)]
        gap = timeline[0]
        assert (gap.first_missing, gap.last_missing, gap.missing) == (6, 40, 35)
        assert gap.describe() == (
            f"history gap: messages 6-40 of room {room} are no longer kept; continuing from 41"
        )
        assert session.gaps == (gap,)
        sent = await session.send("after the gap")
        async with asyncio.timeout(20):
            message = await anext(session)
        assert (message.sequence, message.client_message_id) == (51, sent)
        assert session.last_sequence == 51
        assert session.error is None


async def test_a_gap_at_reconnect_is_reported_once(
    stack: RunningStack,
    person: Callable[[str], Person],
    room: str,
    extra_chat: ExtraReplica,
) -> None:
    """The session's replica dies; while it is down the room moves on and its front is
    deleted past where the session was. When the replica is back the session reports the gap
    in its place, between the messages around it, and delivers the rest once."""
    ada = person("Ada")
    store(stack.database_url, room, 1, 10)
    seen: list[Any] = []
    async with (
        AsyncChatClient(extra_chat.address, token=ada.token) as chat,
        chat.session(room, resume_after=0, on_gap=seen.append) as session,
    ):
        async with asyncio.timeout(20):
            while len(seen) < 10:
                seen.append((await anext(session)).sequence)
        extra_chat.kill()
        await wait_until(lambda: session.state is ConnectionState.RECONNECTING, 20)
        store(stack.database_url, room, 11, 30)
        forget(stack.database_url, room, 25)
        extra_chat.start()
        extra_chat.wait_serving(30)
        async with asyncio.timeout(40):
            while len(seen) < 16:
                seen.append((await anext(session)).sequence)
        assert seen == [*range(1, 11), HistoryGap(room, 10, 26), *range(26, 31)]
        assert session.gaps == (HistoryGap(room, 10, 26),)
        assert session.last_sequence == 30


async def test_a_plain_clients_error_carries_first_sequence(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    ada = person("Ada")
    store(stack.database_url, room, 1, 9)
    forget(stack.database_url, room, 6)
    async with grpc.aio.insecure_channel(stack.chat) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(
            metadata=[("authorization", f"Bearer {ada.token}"), (ROOM_KEY, room), (RESUME_KEY, "2")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    error = error_from_rpc(
        refused.value,
        CallContext(stack.chat, f"/{CHAT_SERVICE}/StreamChat", "PARLEY_CHAT_ADDR", None, True),
    )
    assert isinstance(error, OutOfRange) and isinstance(error, ParleyError)
    assert error.code is grpc.StatusCode.OUT_OF_RANGE
    assert error.reason == "RESUME_POINT_EXPIRED"
    assert error.first_sequence == 7
    assert "resume after 6" in error.hint
    assert "messages 3-6" in error.message


@pytest.mark.parametrize(
    ("reason", "metadata", "first"),
    [
        ("RESUME_POINT_EXPIRED", {"first_sequence": "41"}, 41),
        ("RESUME_POINT_EXPIRED", {}, None),
        ("RESUME_POINT_EXPIRED", {"first_sequence": "-3"}, None),
        ("RESUME_POINT_EXPIRED", {"first_sequence": "9" * 40}, None),
        ("RESUME_POINT_NOT_IN_ROOM", {"first_sequence": "41"}, None),
    ],
)
def test_first_sequence_only_from_a_well_formed_expiry(
    reason: str, metadata: dict[str, str], first: int | None
) -> None:
    error = OutOfRange("gone", reason=reason, metadata=metadata)
    assert error.first_sequence == first


def test_a_gap_of_one_message_reads_as_one() -> None:
    gap = HistoryGap("general", 40, 42)
    assert gap.missing == 1
    assert gap.describe() == (
        "history gap: message 41 of room general is no longer kept; continuing from 42"
    )


def test_chat_pb2_list_messages_response_has_first_sequence() -> None:
    assert chat_pb2.ListMessagesResponse(first_sequence=7).first_sequence == 7


async def _waiting_for_chat_messages(url: str, query: str) -> int:
    """How many sessions whose statement starts with `query` wait for a lock on
    chat_messages."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
            " WHERE NOT l.granted AND l.relation = 'chat_messages'::regclass"
            " AND a.datname = current_database() AND a.query LIKE %s",
            (query + "%",),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


# The chat server's read of where a room's kept history starts (MessageStore.kept).
_KEPT_QUERY = "SELECT coalesce((SELECT min(sequence) FROM chat_messages WHERE room"


async def test_refusals_in_a_row_make_one_gap(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    """A sweep deletes the room's front while the session reconnects: the server refuses its
    resume point (first kept: 11), and refuses the next one too (a batch later, first kept:
    31). No message came between the two refusals, so the caller sees one gap, 6-30, once.

    Two table locks, taken one after the other, hold each of the server's reads of the first
    kept message until the test has deleted what it should see."""
    ada = person("Ada")
    url = stack.database_url
    store(url, room, 1, 50)
    forget(url, room, 10)
    seen: list[Any] = []
    first_lock = await psycopg.AsyncConnection.connect(url)
    second_lock = await psycopg.AsyncConnection.connect(url)
    try:
        await first_lock.execute("LOCK TABLE chat_messages IN ACCESS EXCLUSIVE MODE")
        async with (
            AsyncChatClient(stack.chat, token=ada.token) as chat,
            # A stream let in for `settle` seconds would report the gap as whole: here the
            # server takes as long as the test holds its read.
            chat.session(
                room, resume_after=5, on_gap=seen.append, policy=ReconnectPolicy(settle=120.0)
            ) as session,
        ):
            await wait_until(
                lambda: _waiting_for_chat_messages(url, _KEPT_QUERY), 20, "the first read"
            )
            locking = asyncio.create_task(
                second_lock.execute("LOCK TABLE chat_messages IN ACCESS EXCLUSIVE MODE")
            )
            await wait_until(
                lambda: _waiting_for_chat_messages(url, "LOCK TABLE"), 20, "the second lock"
            )
            await first_lock.commit()  # the first read goes (first kept: 11), then the lock
            await asyncio.wait_for(locking, 20)
            await wait_until(
                lambda: _waiting_for_chat_messages(url, _KEPT_QUERY), 20, "the second read"
            )
            await second_lock.execute(
                "DELETE FROM chat_messages WHERE room = %s AND sequence <= 30", (room,)
            )
            await second_lock.commit()  # the second read: first kept 31, refused again
            async with asyncio.timeout(30):
                while len(seen) < 21:
                    seen.append((await anext(session)).sequence)
            assert seen == [HistoryGap(room, 5, 31), *range(31, 51)]
            assert session.gaps == (HistoryGap(room, 5, 31),)
            assert session.last_sequence == 50
            assert session.error is None
    finally:
        await first_lock.close()
        await second_lock.close()


async def test_a_gap_in_a_room_where_nothing_follows_is_still_reported(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    """Every message went: no message will follow the gap, which the session reports once
    its next stream is let in."""
    ada = person("Ada")
    store(stack.database_url, room, 1, 8)
    forget(stack.database_url, room, 8)
    gaps: list[HistoryGap] = []
    async with (
        AsyncChatClient(stack.chat, token=ada.token) as chat,
        chat.session(room, resume_after=2, on_gap=gaps.append) as session,
    ):
        reading = asyncio.create_task(anext(session))
        try:
            await wait_until(lambda: gaps, 20, "the gap to be reported")
        finally:
            reading.cancel()
        assert gaps == [HistoryGap(room, 2, 9)]
        assert session.last_sequence == 8
