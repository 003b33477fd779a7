"""ListUsers streams rows as it reads them; a client that stops early frees the connection."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from parley.proto import user_pb2, user_pb2_grpc

ACTIVE_LIST_QUERIES = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'parley-user'
  AND state <> 'idle' AND query LIKE '%%FROM users%%'
"""


def pool_settled(pool, server):
    stats = pool(server)
    return stats["size"] >= 1 and stats["idle"] == stats["size"] and stats["waiting"] == 0


async def no_list_query_running(pg) -> bool:
    cur = await pg.execute(ACTIVE_LIST_QUERIES)
    (count,) = await cur.fetchone()
    return count == 0


async def test_cancelling_after_the_first_row_returns_the_connection(
    stub, auth, pg, bulk_insert, server, pool, wait_for
):
    await bulk_insert(pg, 1500)
    for _ in range(3):
        await _cancel_after_the_first_row(stub, auth, pg, server, pool, wait_for)


async def _cancel_after_the_first_row(stub, auth, pg, server, pool, wait_for):
    await wait_for(lambda: pool_settled(pool, server), 5, "the pool to settle")
    requests_before = pool(server)["requests"]

    call = stub.ListUsers(user_pb2.ListUsersRequest(page_size=1000), metadata=auth)
    first = await call.read()
    assert first.id > 0
    assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()

    assert pool(server)["requests"] > requests_before
    await wait_for(lambda: no_list_query_running(pg), 5, "the server's query to end")
    await wait_for(lambda: pool_settled(pool, server), 5, "the connection to return")

    users = [
        u async for u in stub.ListUsers(user_pb2.ListUsersRequest(page_size=1000), metadata=auth)
    ]
    assert len(users) == 1000
    assert users[0] == first


async def test_many_abandoned_streams_do_not_exhaust_the_pool(
    start_server, database, auth, pg, bulk_insert, pool, wait_for
):
    # A pool of two connections: a leak of even two would make the last call time out.
    server = await start_server(
        database, PARLEY_DB_POOL_MIN="1", PARLEY_DB_POOL_MAX="2", PARLEY_DB_POOL_TIMEOUT="2s"
    )
    await bulk_insert(pg, 1200)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        for _ in range(10):
            call = stub.ListUsers(user_pb2.ListUsersRequest(page_size=1000), metadata=auth)
            await call.read()
            call.cancel()

        await wait_for(lambda: pool_settled(pool, server), 5, "every connection to return")
        stats = pool(server)
        assert stats["size"] <= 2
        users = [
            u
            async for u in stub.ListUsers(user_pb2.ListUsersRequest(page_size=1000), metadata=auth)
        ]
        assert len(users) == 1000
