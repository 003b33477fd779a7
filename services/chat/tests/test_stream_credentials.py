"""An open stream holds only as long as what let it in: its token, and its user.

A token is checked when its call starts, and a user when it joins and when it sends; a stream
may outlive both. Each replica checks its streams again every PARLEY_CHAT_RESYNC_INTERVAL
(here 0.2 s): a stream whose token expired ends with UNAUTHENTICATED (reason TOKEN_EXPIRED),
and the streams of a user deleted from UserService with FAILED_PRECONDITION (reason
UNKNOWN_SENDER) once the name cache (PARLEY_USER_CACHE_TTL, here 0.2 s) lets it be asked again.
"""

from __future__ import annotations

import logging
import time

import grpc
import psycopg
import pytest

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.testing import bearer, make_token, wait_until
from parley.testing.launcher import JWT_SECRET
from parley.testing.stack import Person

CHECKS = {"PARLEY_CHAT_RESYNC_INTERVAL": "0.2s", "PARLEY_USER_CACHE_TTL": "0.2s"}
# A client that reads nothing: without BDP probing its window stays at 64 KiB.
NEVER_READS = [("grpc.http2.bdp_probe", 0)]


async def delete_user(stack, person: Person) -> None:
    async with grpc.aio.insecure_channel(stack.users.target) as channel:
        await user_pb2_grpc.UserServiceStub(channel).DeleteUser(
            user_pb2.DeleteUserRequest(id=person.id),
            metadata=bearer(make_token(JWT_SECRET, "admin", "users:write")),
            timeout=10,
        )


@pytest.fixture
async def stack(make_stack):
    return await make_stack(replicas=2, people=("Ada", "Grace"), in_process=True, **CHECKS)


async def test_the_streams_of_a_deleted_user_end_on_every_replica(
    stack, chat, wait_for, details, channels
) -> None:
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    one, two = stack.replicas
    listening = [await chat(ada, one, room="lobby"), await chat(ada, two, room="lobby")]
    other = await chat(grace, two, room="lobby", resume_after=0)
    await other.send("still here")
    await wait_for(lambda: other.received, 10, "Grace's own message")

    await delete_user(stack, ada)
    deleted = time.monotonic()
    codes = [await stream.wait_until_ended(10) for stream in listening]
    took = time.monotonic() - deleted
    print(f"\nthe deleted user's 2 streams ended {took * 1000:.0f} ms after DeleteUser")
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 2
    assert {details(stream.error).reason for stream in listening} == {"UNKNOWN_SENDER"}
    # Within the name cache's TTL plus the check's interval, with room for a loaded machine.
    assert took < 5

    # Everyone else carries on, and the deleted user's new calls are refused.
    await other.send("and on")
    await wait_for(lambda: len(other.received) == 2, 10, "Grace's second message")
    assert not other.ended
    again = await chat(ada, one, room="lobby")
    assert await again.wait_until_ended() == grpc.StatusCode.FAILED_PRECONDITION
    stub = chat_pb2_grpc.ChatServiceStub(channels.get(one.target))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListMessages(
            chat_pb2.ListMessagesRequest(room="lobby"), metadata=bearer(ada.token), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_stream_ends_when_its_token_expires(stack, chat, wait_for, details, token) -> None:
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    # exp 27 s ago: within the 30 s of clock skew the servers allow for 3 s more.
    expiring = Person(ada.id, ada.name, token(str(ada.id), ttl=-27))
    stream = await chat(expiring, stack.replicas[0], room="clock", resume_after=0)
    await stream.send("in time")
    await wait_for(lambda: stream.received, 10, "the message sent in time")
    other = await chat(grace, stack.replicas[0], room="clock")

    assert await stream.wait_until_ended(15) == grpc.StatusCode.UNAUTHENTICATED
    assert details(stream.error).reason == "TOKEN_EXPIRED"
    assert "reconnect with a fresh token" in (stream.error.details() or "")
    assert not other.ended  # Grace's token is good for ten minutes
    # With a fresh token the user resumes where the stream ended.
    fresh = await chat(ada, stack.replicas[0], room="clock", resume_after=0)
    await wait_for(lambda: fresh.received, 10, "the history on the fresh stream")
    assert [m.text for m in fresh.received] == ["in time"]


async def test_a_stream_ended_while_catching_up_gets_no_page_more(
    stack, chat, streams_joined, caplog
) -> None:
    """A stream resuming from 0 in a long room, whose client does not read, is ended (its
    user deleted): once its client reads again it gets what was already on its way, then
    the error, not the rest of the room."""
    caplog.set_level(logging.INFO, logger="parley.chat")
    ada, grace = stack.people["Ada"], stack.people["Grace"]
    stored = 5000  # of 1,000 bytes each: 5 MB, far beyond what a stalled stream holds
    with psycopg.connect(stack.database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES ('backlog', %s)", (stored,)
        )
        conn.execute(
            "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
            " SELECT 'backlog', n, %s, %s, repeat('x', 1000) FROM generate_series(1, %s) n",
            (ada.id, ada.name, stored),
        )
    stream = await chat(
        ada,
        stack.replicas[0],
        room="backlog",
        resume_after=0,
        read=False,
        channel_options=NEVER_READS,
    )
    await streams_joined(stack.replicas[0], grace, "backlog", {ada.id: 1})

    await delete_user(stack, ada)
    await wait_until(lambda: "no longer exists" in caplog.text, 10, "the user check to end it")
    stream.start_reading()
    assert await stream.wait_until_ended(30) == grpc.StatusCode.FAILED_PRECONDITION
    print(f"\n{len(stream.received)} of {stored} messages reached the ended stream")
    assert len(stream.received) < stored // 5
