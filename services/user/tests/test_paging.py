"""ListUsers paging (AIP-158): page sizes, offset pages, keyset page tokens, and the plan."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY as TOKEN_KEY


async def list_page(stub, auth, **request):
    """One ListUsers call: the users it streamed and the next-page token it trailed."""
    call = stub.ListUsers(user_pb2.ListUsersRequest(**request), metadata=auth)
    users = [user async for user in call]
    trailing = await call.trailing_metadata()
    tokens = [value for key, value in trailing if key == TOKEN_KEY]
    assert len(tokens) == 1, f"expected one {TOKEN_KEY} trailer, got {trailing}"
    return users, tokens[0]


async def all_ids(pg) -> list[int]:
    cur = await pg.execute("SELECT id FROM users ORDER BY id")
    return [row[0] for row in await cur.fetchall()]


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


async def test_an_empty_directory_lists_nothing(stub, auth):
    users, token = await list_page(stub, auth)
    assert users == []
    assert token == ""


async def test_users_come_in_id_order_with_every_field(stub, auth):
    created = []
    for i, name in enumerate(["Charlie", "Ada", "Bob"]):
        response = await stub.CreateUser(
            user_pb2.CreateUserRequest(name=name, email=f"{name}@example.com", age=20 + i),
            metadata=auth,
        )
        created.append(response.user)

    # A token with users:write sees every field, emails included (see test_privacy.py).
    users, token = await list_page(stub, auth)

    assert users == created
    assert token == ""


async def test_page_size_zero_means_fifty(stub, auth, pg, bulk_insert):
    await bulk_insert(pg, 60)
    ids = await all_ids(pg)

    users, token = await list_page(stub, auth, page_size=0)

    assert [u.id for u in users] == ids[:50]
    assert token != ""


async def test_page_size_is_clamped_to_1000(stub, auth, pg, bulk_insert):
    await bulk_insert(pg, 1050)
    ids = await all_ids(pg)

    first, token = await list_page(stub, auth, page_size=5000)
    assert [u.id for u in first] == ids[:1000]
    assert token != ""

    second, token = await list_page(stub, auth, page_size=2**31 - 1, page_token=token)
    assert [u.id for u in second] == ids[1000:]
    assert token == ""

    third, _ = await list_page(stub, auth, page=2, page_size=1001)
    assert [u.id for u in third] == ids[1000:]


NEGATIVE_PAGES = [
    ({"page": -1}, ["page"]),
    ({"page_size": -1}, ["page_size"]),
    ({"page": -(2**31), "page_size": -5}, ["page", "page_size"]),
    ({"page_size": -1, "page_token": "anything"}, ["page_size"]),
]


async def test_negative_page_or_page_size_is_invalid(stub, auth, details, subtests):
    for request_fields, bad in NEGATIVE_PAGES:
        with subtests.test(**request_fields):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await list_page(stub, auth, **request_fields)

            found = details(info.value)
            assert found.code == grpc.StatusCode.INVALID_ARGUMENT
            assert found.fields == bad


async def test_page_zero_is_page_one(stub, auth, pg, bulk_insert):
    await bulk_insert(pg, 12)

    zero, zero_token = await list_page(stub, auth, page=0, page_size=5)
    one, one_token = await list_page(stub, auth, page=1, page_size=5)

    assert zero == one
    assert [u.id for u in zero] == (await all_ids(pg))[:5]
    assert zero_token == one_token != ""


async def test_offset_pages_are_consecutive_and_do_not_overlap(stub, auth, pg, bulk_insert):
    await bulk_insert(pg, 23)
    ids = await all_ids(pg)

    pages = []
    for page in range(1, 7):
        users, token = await list_page(stub, auth, page=page, page_size=5)
        pages.append([u.id for u in users])
        assert (token != "") == (page < 5), page

    assert [len(p) for p in pages] == [5, 5, 5, 5, 3, 0]
    assert [i for p in pages for i in p] == ids
    far, token = await list_page(stub, auth, page=2**31 - 1, page_size=1000)
    assert (far, token) == ([], "")


@pytest.mark.parametrize("count", [0, 1, 27, 28, 30])
async def test_following_page_tokens_visits_every_user_once_in_order(
    stub, auth, pg, bulk_insert, count
):
    await bulk_insert(pg, count)
    ids = await all_ids(pg)

    seen: list[int] = []
    token = ""
    calls = 0
    while True:
        # `page` is ignored once a token is given.
        page = 3 if token else 0
        users, token = await list_page(stub, auth, page_size=7, page_token=token, page=page)
        calls += 1
        seen += [u.id for u in users]
        assert len(users) <= 7
        if not token:
            break
        assert len(users) == 7  # only a full page can promise more
        assert calls <= 10

    assert seen == ids
    assert calls == max(1, -(-count // 7))


async def test_keyset_paging_survives_inserts_and_deletes_between_pages(
    stub, auth, pg, bulk_insert
):
    await bulk_insert(pg, 20)
    ids = await all_ids(pg)

    first, token = await list_page(stub, auth, page_size=5)
    assert [u.id for u in first] == ids[:5]

    # Between pages: delete a user already sent, one not sent yet, and add new ones.
    await pg.execute("DELETE FROM users WHERE id = ANY(%s)", ([ids[1], ids[7]],))
    await bulk_insert(pg, 3, prefix="late")

    seen = [u.id for u in first]
    while token:
        users, token = await list_page(stub, auth, page_size=5, page_token=token)
        seen += [u.id for u in users]

    assert len(seen) == len(set(seen)), "a user was listed twice"
    assert seen == sorted(seen)
    assert ids[7] not in seen
    assert seen == ids[:5] + [i for i in ids[5:] if i != ids[7]] + (await all_ids(pg))[-3:]


async def test_a_token_from_a_page_of_deleted_users_still_continues(stub, auth, pg, bulk_insert):
    await bulk_insert(pg, 10)
    ids = await all_ids(pg)
    _, token = await list_page(stub, auth, page_size=4)

    await pg.execute("DELETE FROM users WHERE id = ANY(%s)", (ids[:6],))

    users, token = await list_page(stub, auth, page_size=4, page_token=token)
    assert [u.id for u in users] == ids[6:10]
    assert token == ""


GARBAGE_TOKENS = [
    "garbage",
    "!!!!",
    "x" * 5000,
    "\u00e9\u00e9",
    _token({"v": 2, "after": 1}),
    _token({"v": 1}),
    _token({"v": 1, "after": -1}),
    _token({"v": 1, "after": 2**31}),
    _token({"v": 1, "after": "5"}),
    _token({"v": 1, "after": True}),
    _token([1, 5]),
    _token(None),
]


async def test_a_garbage_page_token_is_invalid(stub, auth, details, pg, bulk_insert, subtests):
    await bulk_insert(pg, 3)
    for token in GARBAGE_TOKENS:
        with subtests.test(token=token[:40]):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await list_page(stub, auth, page_token=token)

            found = details(info.value)
            assert found.code == grpc.StatusCode.INVALID_ARGUMENT
            assert found.fields == ["page_token"]
            assert found.reason == "INVALID_PAGE_TOKEN"


async def test_keyset_query_reads_only_the_rows_it_returns(
    start_server, database, auth, pg, bulk_insert
):
    """The page after a token is read from the primary-key index, skipping nothing row by row.

    The query texts are the ones the server sent (from pg_stat_activity); EXPLAIN ANALYZE
    shows which index the keyset query scans and how many rows that scan produced. Offset
    paging, by contrast, reads every row it skips.
    """
    # No background health probes, so the pooled connection's last query stays readable.
    app = await start_server(database, PARLEY_HEALTH_CHECK_INTERVAL="300")
    await bulk_insert(pg, 20_000)
    await pg.execute("ANALYZE users")
    ids = await all_ids(pg)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        _, token = await list_page(stub, auth, page_size=1)
        await list_page(stub, auth, page_size=1, page_token=token)
        keyset_query = await _last_list_query(pg)
        await list_page(stub, auth, page=2, page_size=1)
        offset_query = await _last_list_query(pg)
    assert keyset_query != offset_query

    # The page of 50 after the 10,000th user: LIMIT 51 (one more tells whether more follow).
    keyset = await _explain(pg, keyset_query, ids[9_999], 51)
    assert keyset["Node Type"] == "Index Scan"
    assert keyset["Index Name"] == "users_pkey"
    assert keyset["Actual Rows"] == 51

    offset = await _explain(pg, offset_query, 51, 10_000)
    assert offset["Actual Rows"] == 10_051


async def _last_list_query(pg) -> str:
    cur = await pg.execute(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'parley-user' AND query LIKE '%%FROM users%%ORDER BY id%%'"
        " ORDER BY query_start DESC LIMIT 1"
    )
    row = await cur.fetchone()
    assert row is not None, "no ListUsers query found in pg_stat_activity"
    return row[0]


async def _explain(pg, query: str, *params: int) -> dict:
    """The plan node under the LIMIT of `query`, executed with `params`."""
    await pg.execute("DEALLOCATE ALL")
    await pg.execute(f"PREPARE page_query AS {query}")
    args = ", ".join(str(int(p)) for p in params)
    cur = await pg.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page_query({args})")
    (plan,) = await cur.fetchone()
    root = plan[0]["Plan"]
    assert root["Node Type"] == "Limit"
    (scan,) = root["Plans"]
    return scan
