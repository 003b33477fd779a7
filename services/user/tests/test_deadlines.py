"""A call whose deadline passes has its query cancelled in Postgres, not left running."""

from __future__ import annotations

import asyncio

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2

from parley.proto import user_pb2

SERVER_BACKENDS = """
SELECT state, wait_event_type, query FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'parley-user'
  AND state <> 'idle'
"""


async def busy_backends(pg) -> list[tuple[str, str | None, str]]:
    cur = await pg.execute(SERVER_BACKENDS)
    return await cur.fetchall()


async def blocked_on_lock(pg, statement: str) -> bool:
    return any(
        state == "active" and wait == "Lock" and query.lstrip().upper().startswith(statement)
        for state, wait, query in await busy_backends(pg)
    )


@pytest.fixture
async def locker(database):
    """A second connection, beside the server's pool, for holding locks in a transaction."""
    async with await psycopg.AsyncConnection.connect(database) as conn:
        yield conn


async def _expect_deadline(call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def _assert_cancelled_in_postgres(pg, wait_for, server, pool) -> None:
    await wait_for(
        lambda: _no_busy_backend(pg), 5, "the server's query to be cancelled in Postgres"
    )
    await wait_for(
        lambda: (s := pool(server))["idle"] == s["size"] and s["waiting"] == 0,
        5,
        "the server's connection to return to its pool",
    )


async def _no_busy_backend(pg) -> bool:
    return not await busy_backends(pg)


@pytest.mark.parametrize("rpc", ["UpdateUser", "DeleteUser"])
async def test_a_write_blocked_past_its_deadline_is_cancelled(
    stub, auth, pg, locker, wait_for, server, pool, rpc
):
    user = (
        await stub.CreateUser(
            user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36), metadata=auth
        )
    ).user
    await locker.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user.id,))

    if rpc == "UpdateUser":
        request = user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
        call = asyncio.ensure_future(stub.UpdateUser(request, metadata=auth, timeout=0.5))
        statement = "UPDATE"
    else:
        request = user_pb2.DeleteUserRequest(id=user.id)
        call = asyncio.ensure_future(stub.DeleteUser(request, metadata=auth, timeout=0.5))
        statement = "DELETE"

    await wait_for(lambda: blocked_on_lock(pg, statement), 5, "the server to wait on the lock")
    await _expect_deadline(call)
    await _assert_cancelled_in_postgres(pg, wait_for, server, pool)

    await locker.rollback()
    got = (await stub.GetUser(user_pb2.GetUserRequest(id=user.id), metadata=auth)).user
    assert got == user


async def test_a_list_blocked_past_its_deadline_is_cancelled(
    stub, auth, pg, locker, wait_for, server, pool
):
    await stub.CreateUser(
        user_pb2.CreateUserRequest(name="Ada", email="ada@example.com", age=36), metadata=auth
    )
    await locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")

    async def read_all():
        call = stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth, timeout=0.5)
        return [user async for user in call]

    call = asyncio.ensure_future(read_all())
    await wait_for(lambda: blocked_on_lock(pg, "SELECT"), 5, "the server to wait on the lock")
    await _expect_deadline(call)
    await _assert_cancelled_in_postgres(pg, wait_for, server, pool)

    await locker.rollback()
    users = [u async for u in stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth)]
    assert [u.email for u in users] == ["ada@example.com"]


async def test_a_create_blocked_past_its_deadline_stores_nothing(
    stub, auth, pg, locker, wait_for, server, pool
):
    # An uncommitted insert of the same email makes the unique index wait for this transaction.
    await locker.execute(
        "INSERT INTO users (name, email, age) VALUES ('Holder', 'ada@example.com', 1)"
    )
    call = asyncio.ensure_future(
        stub.CreateUser(
            user_pb2.CreateUserRequest(name="Ada", email="ADA@example.com", age=36),
            metadata=auth,
            timeout=0.5,
        )
    )

    await wait_for(lambda: blocked_on_lock(pg, "INSERT"), 5, "the server to wait on the lock")
    await _expect_deadline(call)
    await _assert_cancelled_in_postgres(pg, wait_for, server, pool)

    await locker.rollback()
    cur = await pg.execute("SELECT count(*) FROM users")
    assert await cur.fetchone() == (0,)
