"""ListUsers reads a whole page, returns the connection to the pool, then streams the page: a
client that reads slowly, stops reading or cancels holds no pooled connection."""

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


async def test_a_stream_that_is_never_read_holds_no_connection(
    start_server, database, auth, pg, bulk_insert, pool, wait_for
):
    # A pool of one connection: a stream holding it would make every other call wait.
    server = await start_server(
        database, PARLEY_DB_POOL_MIN="1", PARLEY_DB_POOL_MAX="1", PARLEY_DB_POOL_TIMEOUT="2s"
    )
    await bulk_insert(pg, 1500)
    # No BDP probing and a 1 KiB window: the server can send a few users, then must wait.
    reader_options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    target = f"127.0.0.1:{server.port}"
    async with (
        grpc.aio.insecure_channel(target, options=reader_options) as stalled_channel,
        grpc.aio.insecure_channel(target) as channel,
    ):
        stalled = user_pb2_grpc.UserServiceStub(stalled_channel).ListUsers(
            user_pb2.ListUsersRequest(page_size=1000), metadata=auth
        )
        first = await stalled.read()
        await wait_for(lambda: pool_settled(pool, server), 5, "the connection to return")

        stub = user_pb2_grpc.UserServiceStub(channel)
        for _ in range(3):
            got = await stub.GetUser(user_pb2.GetUserRequest(id=first.id), metadata=auth, timeout=1)
            assert got.user == first
        # The stalled stream still delivers its whole page, in order, when read at last.
        rest = []
        while (user := await stalled.read()) is not grpc.aio.EOF:
            rest.append(user)
        assert [u.id for u in [first, *rest]] == list(range(first.id, first.id + 1000))
