"""ImportUsers: per-row results, all-or-nothing on cancellation, the error list limit, and no
pooled connection held while the client is sending."""

from __future__ import annotations

import asyncio

import grpc
import psycopg
import pytest

from parley.proto import user_pb2
from parley.proto.contract import EXPLICIT_IMPORT_COMMIT, IMPORT_COMMIT_KEY

OPEN_TRANSACTION = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'parley-user'
  AND backend_xid IS NOT NULL
"""


def row(name="Row", email="row@example.com", age=30):
    return user_pb2.CreateUserRequest(name=name, email=email, age=age)


async def stored(pg) -> list[tuple[str, str, int]]:
    cur = await pg.execute("SELECT name, email, age FROM users ORDER BY id")
    return await cur.fetchall()


async def test_import_creates_good_rows_and_reports_each_bad_one(stub, auth, pg):
    await stub.CreateUser(row("Existing", "taken@example.com"), metadata=auth)
    rows = [
        row("Ada", "ada@example.com", 36),  # 0 ok
        row("   ", "blank@example.com", 1),  # 1 bad name
        row("Grace", "grace@example.com", 45),  # 2 ok
        row("Copy", "TAKEN@example.com", 2),  # 3 taken before the import
        row("Ada again", "Ada@Example.com", 3),  # 4 taken earlier in this stream
        row("", "not-an-email", 200),  # 5 three bad fields
        row("Linus", "linus@example.com", 0),  # 6 ok
        row("Ken", "ken@example.com", -1),  # 7 bad age
    ]

    response = await stub.ImportUsers(iter(rows), metadata=auth)

    assert (response.created_count, response.failed_count) == (3, 5)
    errors = [(e.index, e.code, e.field) for e in response.errors]
    assert errors == [
        (1, "INVALID_ARGUMENT", "name"),
        (3, "ALREADY_EXISTS", "email"),
        (4, "ALREADY_EXISTS", "email"),
        (5, "INVALID_ARGUMENT", "name,email,age"),
        (7, "INVALID_ARGUMENT", "age"),
    ]
    assert all(e.message for e in response.errors)
    assert "TAKEN@example.com" in response.errors[1].message
    assert await stored(pg) == [
        ("Existing", "taken@example.com", 30),
        ("Ada", "ada@example.com", 36),
        ("Grace", "grace@example.com", 45),
        ("Linus", "linus@example.com", 0),
    ]


async def test_imported_rows_are_trimmed_and_readable(stub, auth):
    response = await stub.ImportUsers(iter([row("  Ada  ", " ada@example.com ")]), metadata=auth)
    assert response.created_count == 1

    users = [u async for u in stub.ListUsers(user_pb2.ListUsersRequest(), metadata=auth)]
    assert [(u.name, u.email) for u in users] == [("Ada", "ada@example.com")]


async def test_an_empty_import_creates_nothing(stub, auth, pg):
    response = await stub.ImportUsers(iter([]), metadata=auth)

    assert response == user_pb2.ImportUsersResponse(created_count=0, failed_count=0)
    assert await stored(pg) == []


async def test_an_import_of_only_bad_rows_stores_nothing(stub, auth, pg):
    response = await stub.ImportUsers(iter([row(name=""), row(email="x")]), metadata=auth)

    assert (response.created_count, response.failed_count) == (0, 2)
    assert await stored(pg) == []


async def test_the_error_list_stops_at_1000_but_failures_are_all_counted(stub, auth, pg):
    rows = [row(f"User {i}", f"u{i}@example.com", age=-1) for i in range(1005)]
    rows.append(row("Last", "last@example.com"))

    response = await stub.ImportUsers(iter(rows), metadata=auth)

    assert (response.created_count, response.failed_count) == (1, 1005)
    assert len(response.errors) == 1000
    assert [e.index for e in response.errors] == list(range(1000))
    assert await stored(pg) == [("Last", "last@example.com", 30)]


async def test_invalid_and_taken_rows_are_listed_together_in_row_order(stub, auth, pg):
    await pg.execute(
        "INSERT INTO users (name, email, age)"
        " SELECT 'Holder', 'taken' || g || '@example.com', 1 FROM generate_series(0, 599) AS g"
    )
    # Even rows have a taken email, odd rows a bad age: 1,200 failures, then one good row.
    rows = [
        row("Taken", f"TAKEN{i // 2}@example.com") if i % 2 == 0 else row(age=-1)
        for i in range(1200)
    ]
    rows.append(row("Last", "last@example.com"))

    response = await stub.ImportUsers(iter(rows), metadata=auth)

    assert (response.created_count, response.failed_count) == (1, 1200)
    assert [(e.index, e.code) for e in response.errors] == [
        (i, "ALREADY_EXISTS" if i % 2 == 0 else "INVALID_ARGUMENT") for i in range(1000)
    ]
    assert (
        response.errors[0].field == "email" and "TAKEN0@example.com" in response.errors[0].message
    )
    assert response.errors[1].field == "age"
    cur = await pg.execute("SELECT email FROM users WHERE name <> 'Holder'")
    assert await cur.fetchall() == [("last@example.com",)]


def _import_messages_received(server) -> float:
    return (
        server.metrics.registry.get_sample_value(
            "grpc_server_msg_received_total",
            {
                "grpc_type": "client_stream",
                "grpc_service": "user.UserService",
                "grpc_method": "ImportUsers",
            },
        )
        or 0.0
    )


async def _stream_until_rows_are_received(stub, auth, pg, wait_for, server, pool, **options):
    """Starts an import, writes rows, and returns once the server has received them all.

    While the client has not finished sending, the server holds no connection for it: no
    transaction is open and every pooled connection is idle.
    """
    received = _import_messages_received(server)
    call = stub.ImportUsers(metadata=auth, **options)
    for i in range(5):
        await call.write(row(f"User {i}", f"user{i}@example.com"))

    await wait_for(
        lambda: _import_messages_received(server) == received + 5,
        10,
        "the server to receive the import's rows",
    )
    assert await _transaction_gone(pg)
    # Health checks borrow a connection now and then; none stays lent while the client sends.
    await wait_for(lambda: _pool_settled(pool, server), 10, "every pooled connection idle")
    assert await _transaction_gone(pg)
    assert await stored(pg) == []
    return call


async def _transaction_gone(pg) -> bool:
    cur = await pg.execute(OPEN_TRANSACTION)
    (count,) = await cur.fetchone()
    return count == 0


async def _pool_settled(pool, server) -> bool:
    stats = pool(server)
    return stats["idle"] == stats["size"] and stats["waiting"] == 0


async def test_a_cancelled_import_stores_nothing(stub, auth, pg, wait_for, server, pool):
    # Declared: a call cut short before its commit stores nothing, whatever the timing.
    declared = [*auth, (IMPORT_COMMIT_KEY, EXPLICIT_IMPORT_COMMIT)]
    call = await _stream_until_rows_are_received(stub, declared, pg, wait_for, server, pool)

    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert await stored(pg) == []
    await wait_for(lambda: _pool_settled(pool, server), 10, "every pooled connection idle")
    # The same emails are free and the service still imports.
    response = await stub.ImportUsers(
        iter([row(f"User {i}", f"user{i}@example.com") for i in range(5)]), metadata=auth
    )
    assert response.created_count == 5
    assert len(await stored(pg)) == 5


async def test_an_import_past_its_deadline_stores_nothing(stub, auth, pg, wait_for, server, pool):
    declared = [*auth, (IMPORT_COMMIT_KEY, EXPLICIT_IMPORT_COMMIT)]
    call = await _stream_until_rows_are_received(
        stub, declared, pg, wait_for, server, pool, timeout=1.0
    )

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    await wait_for(lambda: _transaction_gone(pg), 10, "the import's transaction to end")
    assert await stored(pg) == []


BLOCKED_INSERT = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'parley-user'
  AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO users%%'
"""


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
async def test_an_import_cut_short_while_storing_stores_nothing(
    stub, auth, pg, database, wait_for, server, pool, ending
):
    """The client has sent every row; the call ends while the rows are being inserted."""
    # An uncommitted row with the email of the import's last row makes its insert wait.
    async with await psycopg.AsyncConnection.connect(database) as locker:
        await locker.execute(
            "INSERT INTO users (name, email, age) VALUES ('Holder', 'user2@example.com', 1)"
        )
        rows = [row(f"User {i}", f"user{i}@example.com") for i in range(3)]
        timeout = 2.0 if ending == "deadline" else None
        call = stub.ImportUsers(iter(rows), metadata=auth, timeout=timeout)

        async def insert_blocked() -> bool:
            cur = await pg.execute(BLOCKED_INSERT)
            (count,) = await cur.fetchone()
            return count == 1

        await wait_for(insert_blocked, 10, "the import's insert to wait on the lock")
        if ending == "cancel":
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: _transaction_gone(pg), 10, "the import's transaction to end")
        await locker.rollback()

    assert await stored(pg) == []
    await wait_for(lambda: _pool_settled(pool, server), 10, "every pooled connection idle")
