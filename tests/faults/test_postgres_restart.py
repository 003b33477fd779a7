"""Postgres stops (fast shutdown) and comes back while UserService and a chat replica run."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence

import grpc
import psycopg

from parley.proto import chat_pb2, chat_pb2_grpc, user_pb2, user_pb2_grpc
from parley.proto.contract import ROOM_KEY
from parley.testing import bearer, wait_until
from parley.testing.stack import USER_DEPENDENCY, create_people, stored_messages

from .conftest import ADMIN_TOKEN, NOT_SERVING, SERVING, TOKEN_TTL, Cluster, Fleet

DEADLINE = 5.0
# Pool timeout as shipped (PARLEY_DB_POOL_TIMEOUT's default): once a service knows Postgres is
# down, its calls must fail well inside it, not each wait it out.
POOL_TIMEOUT = "5"
# How long Postgres stays down: long enough for psycopg_pool's reconnect back-off to grow
# (1, 2, 4, 8 s...), so recovery time after a long outage is what is measured.
OUTAGE = 12.0
FAST_FAIL = 0.5


async def timed(call: object) -> tuple[float, grpc.StatusCode]:
    """Awaits a unary call; returns (seconds, status code)."""
    started = time.monotonic()
    try:
        await call  # type: ignore[misc]
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    return time.monotonic() - started, code


async def chat_write(channel: grpc.aio.Channel, token: str, text: str) -> tuple[float, object]:
    """Opens a stream, writes one message and waits for its echo or the stream's end;
    returns (seconds, the stored message or the status code that ended the stream)."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    started = time.monotonic()
    call = stub.StreamChat(metadata=[*bearer(token), (ROOM_KEY, "pg")], timeout=DEADLINE)
    client_id = uuid.uuid4().hex
    try:
        await call.write(chat_pb2.ChatMessage(text=text, client_message_id=client_id))
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return time.monotonic() - started, "EOF"
            if message.client_message_id == client_id:
                return time.monotonic() - started, message
    except grpc.aio.AioRpcError as error:
        return time.monotonic() - started, error.code()
    except asyncio.InvalidStateError:
        return time.monotonic() - started, (await call.code())
    finally:
        call.cancel()


async def test_postgres_stops_and_comes_back(cluster: Cluster, fleet: Fleet) -> None:
    users = await fleet.add("user", PARLEY_DB_POOL_TIMEOUT=POOL_TIMEOUT)
    chat = await fleet.add(
        "chat", PARLEY_USER_SERVICE_ADDR=users.target, PARLEY_DB_POOL_TIMEOUT=POOL_TIMEOUT
    )
    await fleet.wait_health(chat, SERVING, 20, name=USER_DEPENDENCY)
    (ada,) = (await create_people(users.target, ["Ada"], ttl=TOKEN_TTL)).values()
    pids = (users.pid, chat.pid)
    admin = bearer(ADMIN_TOKEN)
    created: dict[str, int] = {}  # email -> id, of CreateUser calls that succeeded
    failed_emails: list[str] = []

    async with (
        grpc.aio.insecure_channel(users.target) as user_channel,
        grpc.aio.insecure_channel(chat.target) as chat_channel,
    ):
        user_stub = user_pb2_grpc.UserServiceStub(user_channel)

        async def create(email: str) -> tuple[float, grpc.StatusCode]:
            request = user_pb2.CreateUserRequest(name="Pat", email=email, age=40)
            started = time.monotonic()
            try:
                reply = await user_stub.CreateUser(request, metadata=admin, timeout=DEADLINE)
                created[email] = reply.user.id
                return time.monotonic() - started, grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                failed_emails.append(email)
                return time.monotonic() - started, error.code()

        before = await create("before@example.com")
        assert before[1] == grpc.StatusCode.OK, f"CreateUser before the fault: {before}"
        ok_before = await chat_write(chat_channel, ada.token, "before")
        assert isinstance(ok_before[1], chat_pb2.ChatMessage), f"chat write before: {ok_before}"

        stopped_at = time.monotonic()
        await asyncio.to_thread(cluster.postgres.stop)
        stop_took = time.monotonic() - stopped_at

        # Readiness goes NOT_SERVING on both services.
        user_down, chat_down = await asyncio.gather(
            fleet.wait_health(users, NOT_SERVING, 10), fleet.wait_health(chat, NOT_SERVING, 10)
        )

        # Calls fail fast with UNAVAILABLE, not each one waiting out the pool timeout, for as
        # long as Postgres stays down.
        gets: list[tuple[float, grpc.StatusCode]] = []
        writes: list[tuple[float, grpc.StatusCode]] = []
        chat_writes: list[tuple[float, object]] = []
        while time.monotonic() - stopped_at < OUTAGE:
            gets.append(
                await timed(
                    user_stub.GetUser(
                        user_pb2.GetUserRequest(id=ada.id), metadata=admin, timeout=DEADLINE
                    )
                )
            )
            writes.append(await create(f"down-{len(writes)}@example.com"))
            chat_writes.append(await chat_write(chat_channel, ada.token, "while down"))

        def slowest(results: Sequence[tuple[float, object]]) -> str:
            return f"{len(results)} calls, slowest {max(took for took, _ in results):.2f}s"

        print(
            f"\npostgres stop took {stop_took:.2f}s; NOT_SERVING after user {user_down:.2f}s,"
            f" chat {chat_down:.2f}s; while down: GetUser {slowest(gets)}, CreateUser"
            f" {slowest(writes)}, chat write {slowest(chat_writes)}"
        )
        # Every call fails UNAVAILABLE before its deadline, and typically after the short wait,
        # not the pool timeout: the median, since a busy machine can stall any single call.
        for name, results in (
            ("GetUser", gets),
            ("CreateUser", writes),
            ("chat write", chat_writes),
        ):
            for took, outcome in results:
                assert outcome == grpc.StatusCode.UNAVAILABLE, f"{name}, Postgres down: {outcome}"
                assert took < DEADLINE - 0.5, f"{name} took {took:.2f}s to fail"
            median = statistics.median(took for took, _ in results)
            assert median < FAST_FAIL, f"{name} took {median:.2f}s (median) to fail"

        # Postgres comes back on the same port and data: no restart of the services needed.
        await asyncio.to_thread(cluster.postgres.start, timeout=60)
        back_at = time.monotonic()
        user_up, chat_up = await asyncio.gather(
            fleet.wait_health(users, SERVING, 15), fleet.wait_health(chat, SERVING, 15)
        )
        get_back = await timed(
            user_stub.GetUser(user_pb2.GetUserRequest(id=ada.id), metadata=admin, timeout=DEADLINE)
        )
        first_get = time.monotonic() - back_at
        first_ok = time.monotonic()

        async def create_works() -> bool:
            return (await create(f"after-{uuid.uuid4().hex[:6]}@example.com"))[1] == (
                grpc.StatusCode.OK
            )

        await wait_until(create_works, 10, "CreateUser to succeed after Postgres came back")
        create_after = time.monotonic() - first_ok
        after = await chat_write(chat_channel, ada.token, "after")
        print(
            f"SERVING again after user {user_up:.2f}s, chat {chat_up:.2f}s; first GetUser"
            f" {get_back} done {first_get:.2f}s after Postgres was back; first CreateUser"
            f" after SERVING in {create_after:.2f}s; chat write after: {after[0]:.2f}s"
        )
        assert get_back[1] == grpc.StatusCode.OK, f"first GetUser after recovery: {get_back}"
        assert isinstance(after[1], chat_pb2.ChatMessage), f"chat write after: {after}"
        get_after = await timed(
            user_stub.GetUser(user_pb2.GetUserRequest(id=ada.id), metadata=admin, timeout=DEADLINE)
        )
        assert get_after[1] == grpc.StatusCode.OK, f"GetUser after recovery: {get_after}"

    assert (users.pid, chat.pid) == pids, "a service process was replaced"
    assert users.alive() and chat.alive(), "a service exited"

    # Nothing half-written: exactly the successful creates exist, none of the failed ones.
    async with await psycopg.AsyncConnection.connect(cluster.database, autocommit=True) as conn:
        cur = await conn.execute("SELECT email, id FROM users WHERE email LIKE '%%@example.com'")
        rows = {email: user_id for email, user_id in await cur.fetchall()}
    extra = [email for email in failed_emails if email in rows]
    assert not extra, f"CreateUser failed but the row exists: {extra}"
    missing = [email for email in created if rows.get(email) != created[email]]
    assert not missing, f"CreateUser succeeded but the row is missing: {missing}"
    texts = [row.text for row in await stored_messages(cluster.database, "pg")]
    assert texts == ["before", "after"], f"stored chat messages in room pg: {texts}"
