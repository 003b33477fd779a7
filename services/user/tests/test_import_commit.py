"""ImportUsers' commit signal: a client that declares `x-import-commit: explicit` has its rows
stored only once a message with `commit` arrives, so a call cut off before that stores nothing
whatever the timing; a client that does not declare (the tutorial's) commits by half-closing.

Every test here waits for the server's handler to end (grpc_server_handled_total) before it
reads the table, so a commit that came late could not slip past it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from parley.proto import user_pb2, user_pb2_grpc
from parley.testing.tokens import make_token
from parley.user_service.importing import EXPLICIT_COMMIT, IMPORT_COMMIT_KEY

EXPLICIT = (IMPORT_COMMIT_KEY, EXPLICIT_COMMIT)
COMMIT = user_pb2.CreateUserRequest(commit=True)
IMPORT_LABELS = {"grpc_service": "user.UserService", "grpc_method": "ImportUsers"}
# The repeated cut-off tests: how many calls, and their deadlines (seconds), short but long
# enough for the rows to reach the handler first.
RUNS = 30


def row(name: str = "Row", email: str = "row@example.com", age: int = 30, commit: bool = False):
    return user_pb2.CreateUserRequest(name=name, email=email, age=age, commit=commit)


def declared(auth):
    return [*auth, EXPLICIT]


async def stored(pg) -> list[tuple[str, str, int]]:
    cur = await pg.execute("SELECT name, email, age FROM users ORDER BY id")
    return await cur.fetchall()


def received(server) -> float:
    labels = {**IMPORT_LABELS, "grpc_type": "client_stream"}
    value = server.metrics.registry.get_sample_value("grpc_server_msg_received_total", labels)
    return value or 0.0


def handled(server) -> dict[str, float]:
    """ImportUsers calls the server has ended, by grpc_code (codes never seen left out)."""
    counts: dict[str, float] = {}
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name == "grpc_server_handled_total"
                and labels.get("grpc_method") == "ImportUsers"
                and sample.value
            ):
                counts[labels["grpc_code"]] = sample.value
    return counts


async def ended(server, wait_for, count: float) -> None:
    """Waits until the server has ended `count` ImportUsers calls in all."""
    await wait_for(lambda: sum(handled(server).values()) == count, 10, f"{count:g} imports ended")


def import_logs(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "parley.user" and r.getMessage().startswith(("imported", "import not"))
    ]


# --- The explicit signal ---------------------------------------------------------------------


async def test_commit_on_the_last_row_stores_the_import(stub, auth, pg, caplog):
    caplog.set_level(logging.INFO, logger="parley.user")
    rows = [
        row("Ada", "ada@example.com", 36),
        row("   ", "blank@example.com"),
        row("Grace", "grace@example.com", 45, commit=True),
    ]

    response = await stub.ImportUsers(iter(rows), metadata=declared(auth))

    assert (response.created_count, response.failed_count) == (2, 1)
    assert [(e.index, e.code, e.field) for e in response.errors] == [
        (1, "INVALID_ARGUMENT", "name")
    ]
    assert await stored(pg) == [("Ada", "ada@example.com", 36), ("Grace", "grace@example.com", 45)]
    assert import_logs(caplog) == ["imported users: 2 created, 1 failed"]


async def test_a_message_with_only_commit_ends_the_import_without_a_row(stub, auth, pg):
    rows = [row("Ada", "ada@example.com"), row(age=-1), row("Linus", "linus@example.com"), COMMIT]

    response = await stub.ImportUsers(iter(rows), metadata=declared(auth))

    # The commit message is no row: no index, no error, no user.
    assert (response.created_count, response.failed_count) == (2, 1)
    assert [(e.index, e.field) for e in response.errors] == [(1, "age")]
    assert [email for _, email, _ in await stored(pg)] == ["ada@example.com", "linus@example.com"]


async def test_a_failed_row_may_carry_the_commit(stub, auth, pg):
    rows = [row("Ada", "ada@example.com"), row("", "bad@example.com", commit=True)]

    response = await stub.ImportUsers(iter(rows), metadata=declared(auth))

    assert (response.created_count, response.failed_count) == (1, 1)
    assert [(e.index, e.field) for e in response.errors] == [(1, "name")]
    assert [email for _, email, _ in await stored(pg)] == ["ada@example.com"]


async def test_an_import_of_only_the_commit_creates_nothing(stub, auth, pg):
    response = await stub.ImportUsers(iter([COMMIT]), metadata=declared(auth))

    assert response == user_pb2.ImportUsersResponse(created_count=0, failed_count=0)
    assert await stored(pg) == []


async def test_a_client_that_declares_nothing_may_still_send_commit(stub, auth, pg):
    response = await stub.ImportUsers(
        iter([row("Ada", "ada@example.com", commit=True)]), metadata=auth
    )

    assert response.created_count == 1
    assert len(await stored(pg)) == 1


# --- Declared, ended without the signal --------------------------------------------------------


async def test_a_declared_import_that_half_closes_without_commit_stores_nothing(
    stub, auth, pg, details, server, wait_for, caplog
):
    caplog.set_level(logging.INFO, logger="parley.user")
    rows = [row("Ada", "ada@example.com"), row("Grace", "grace@example.com"), row(age=-1)]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ImportUsers(iter(rows), metadata=declared(auth))

    found = details(info.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.reason == "IMPORT_NOT_COMMITTED"
    assert found.fields == ["commit"]
    assert "ended after 3 row(s) without a message that sets commit" in found.message
    assert "nothing was stored" in found.message
    await ended(server, wait_for, 1)
    assert handled(server) == {"InvalidArgument": 1}
    assert await stored(pg) == []
    assert import_logs(caplog) == ["import not committed: 3 row(s) received, none stored"]

    # The same rows, committed this time, are all free to store.
    response = await stub.ImportUsers(iter([*rows, COMMIT]), metadata=declared(auth))
    assert (response.created_count, response.failed_count) == (2, 1)


async def test_a_declared_empty_stream_stores_nothing(stub, auth, pg, details):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ImportUsers(iter([]), metadata=declared(auth))

    assert details(info.value).reason == "IMPORT_NOT_COMMITTED"
    assert await stored(pg) == []


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "undeclared"])
async def test_a_message_after_the_commit_is_refused_and_nothing_is_stored(
    stub, auth, pg, details, declare
):
    for after in (row("Late", "late@example.com"), COMMIT):
        rows = [row("Ada", "ada@example.com", commit=True), after]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportUsers(iter(rows), metadata=declared(auth) if declare else auth)

        found = details(info.value)
        assert found.code == grpc.StatusCode.INVALID_ARGUMENT
        assert found.reason == "MESSAGE_AFTER_COMMIT"
        assert found.fields == ["commit"]
        assert await stored(pg) == []


@pytest.mark.parametrize(
    "values",
    [["Explicit"], ["yes"], [""], ["explicit", "explicit"], ["half-close"]],
    ids=["capitalised", "yes", "empty", "twice", "other"],
)
async def test_a_declaration_other_than_explicit_is_refused_before_any_row(
    stub, auth, pg, details, server, wait_for, values
):
    metadata = [*auth, *((IMPORT_COMMIT_KEY, value) for value in values)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ImportUsers(
            iter([row("Ada", "ada@example.com", commit=True)]), metadata=metadata
        )

    found = details(info.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.fields == [IMPORT_COMMIT_KEY]
    assert "'explicit'" in found.message
    await ended(server, wait_for, 1)
    assert received(server) == 0, "the handler read a row before refusing the declaration"
    assert await stored(pg) == []


# --- Declared, cut off: nothing stored, every time ----------------------------------------------


async def test_declared_imports_cut_off_by_their_deadline_store_nothing(
    stub, auth, pg, server, wait_for, caplog
):
    """The race the 20 ms wait used to lose: the deadline ends the request stream before the
    server hears of the deadline. Repeated with deadlines from 0.2 to 0.5 s."""
    caplog.set_level(logging.INFO, logger="parley.user")
    codes = []
    for run in range(RUNS):
        rows_before = received(server)
        call = stub.ImportUsers(metadata=declared(auth), timeout=0.2 + (run % 7) * 0.05)
        for index in range(3):
            await call.write(row(f"Run {run}", f"run{run}.{index}@example.com"))
        # The client never sends commit and never half-closes: only the deadline ends the call.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        codes.append(info.value.code())
        await ended(server, wait_for, run + 1)
        # The rows reached the handler: a server that committed at the stream's end would
        # have stored them.
        assert received(server) == rows_before + 3, f"run {run}: the rows never arrived"
        assert await stored(pg) == [], f"run {run} stored its rows"

    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert sum(handled(server).values()) == RUNS
    assert not [line for line in import_logs(caplog) if line.startswith("imported")]


async def test_declared_imports_cancelled_by_their_client_store_nothing(
    stub, auth, pg, server, wait_for
):
    for run in range(RUNS):
        rows_before = received(server)
        call = stub.ImportUsers(metadata=declared(auth))
        for index in range(3):
            await call.write(row(f"Run {run}", f"run{run}.{index}@example.com"))
        await wait_for(lambda: received(server) == rows_before + 3, 10, "the rows to arrive")  # noqa: B023

        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await ended(server, wait_for, run + 1)
        assert await stored(pg) == [], f"run {run} stored its rows"


async def test_a_declared_import_cut_off_after_its_commit_arrived_may_be_stored_but_once(
    stub, auth, pg, server, wait_for
):
    """Once `commit` has arrived a cut-off races the commit (as gRPC allows): the rows are
    stored completely or not at all, and a retry reports the stored ones ALREADY_EXISTS."""
    rows = [row(f"User {i}", f"user{i}@example.com") for i in range(3)]
    call = stub.ImportUsers(metadata=declared(auth))
    for request in [*rows, COMMIT]:
        await call.write(request)
    call.cancel()
    try:
        await call
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass  # cancelled, or the reply came first: both are allowed here
    await ended(server, wait_for, 1)
    first = await stored(pg)
    assert first in ([], [(r.name, r.email, r.age) for r in rows])

    retry = await stub.ImportUsers(iter([*rows, COMMIT]), metadata=declared(auth))
    assert retry.created_count + retry.failed_count == 3
    assert retry.failed_count == len(first)
    assert len(await stored(pg)) == 3


# --- Undeclared: the tutorial's clients ----------------------------------------------------------


async def test_an_undeclared_half_close_still_commits(stub, auth, pg, caplog):
    caplog.set_level(logging.INFO, logger="parley.user")
    rows = [row("Ada", "ada@example.com"), row("", "bad@example.com")]

    response = await stub.ImportUsers(iter(rows), metadata=auth)

    assert (response.created_count, response.failed_count) == (1, 1)
    assert await stored(pg) == [("Ada", "ada@example.com", 30)]
    assert import_logs(caplog) == ["imported users: 1 created, 1 failed"]


# --- CreateUser ----------------------------------------------------------------------------------


async def test_create_user_refuses_commit_with_the_other_bad_fields(stub, auth, pg, details):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateUser(row("Ada", "ada@example.com", commit=True), metadata=auth)
    found = details(info.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.fields == ["commit"]
    assert "ImportUsers only" in found.message

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateUser(row("", "ada@example.com", commit=True), metadata=auth)
    assert details(info.value).fields == ["name", "commit"]
    assert await stored(pg) == []


# --- What else an import can end with, declared: unchanged ------------------------------------


async def test_the_row_limit_counts_rows_not_the_commit_message(
    start_server, database, auth, pg, details
):
    server = await start_server(database, PARLEY_IMPORT_MAX_ROWS="2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        two = [row("A", "a@example.com"), row("B", "b@example.com")]
        response = await stub.ImportUsers(iter([*two, COMMIT]), metadata=declared(auth))
        assert response.created_count == 2

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportUsers(
                iter(
                    [
                        row("C", "c@example.com"),
                        row("D", "d@example.com"),
                        row("E", "e@x.com", commit=True),
                    ]
                ),
                metadata=declared(auth),
            )
    found = details(info.value)
    assert found.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert found.metadata["setting"] == "PARLEY_IMPORT_MAX_ROWS"
    assert len(await stored(pg)) == 2


BAD_UTF8 = b"\xff\xfe\xfd\xfc"  # as long as "MARK", so the length prefix still holds


def _bad_utf8_row() -> bytes:
    data = row("MARK", "mark@example.com").SerializeToString()
    return data.replace(b"MARK", BAD_UTF8, 1)


async def test_a_row_that_does_not_parse_ends_a_declared_import(server, auth, pg, details):
    # Nothing after the refused row: a write racing the server's refusal would make grpcio
    # report INTERNAL instead of the server's status (see the SDK's session on that).
    payloads = [row("Ada", "ada@example.com").SerializeToString(), _bad_utf8_row()]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_unary("/user.UserService/ImportUsers")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(iter(payloads), metadata=declared(auth))

    found = details(info.value)
    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.fields == ["name"]
    assert await stored(pg) == []


async def test_an_oversized_row_ends_a_declared_import(start_server, database, auth, pg, details):
    server = await start_server(database, PARLEY_MAX_MESSAGE_BYTES="65536")
    big = row("x" * 65536, "big@example.com")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportUsers(
                iter([row("Ada", "ada@example.com"), big]), metadata=declared(auth)
            )

    found = details(info.value)
    assert found.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PARLEY_MAX_MESSAGE_BYTES=65536" in found.message
    assert await stored(pg) == []


async def test_a_declared_import_needs_a_valid_token_with_the_write_scope(
    stub, read_auth, token, pg, details
):
    forged = make_token("another-secret-that-is-long-enough-for-hs256", "1", "users:write")
    cases = [
        ([], grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        ([("authorization", f"Bearer {forged}")], grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
        (
            [("authorization", f"Bearer {token('1', 'users:write', ttl=-3600)}")],
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_EXPIRED",
        ),
        (read_auth, grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"),
    ]
    for metadata, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportUsers(
                iter([row("Ada", "ada@example.com", commit=True)]), metadata=declared(metadata)
            )
        found = details(info.value)
        assert (found.code, found.reason) == (code, reason)
    assert await stored(pg) == []
