"""Per-user limits and bounded reads, part by part: the settings, what a resume point and a
text may be, the sender's budget in Postgres (shared by every stream, spent by resends too),
and catch-up pages cut by size that still deliver every message once, in order."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.chassis import ConfigError, Database, DatabaseSettings, Env, InvalidArgument
from parley.chat_service import ChatSettings
from parley.chat_service.rooms import check_text
from parley.chat_service.servicer import MAX_PAGE_BYTES, _resume_point
from parley.chat_service.store import Appended, MessageStore
from parley.proto.contract import RESUME_KEY

BASE_ENV = {
    "PARLEY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_REDIS_URL": "redis://127.0.0.1:6379/0",
}
MAX_SEQUENCE = 2**63 - 1


# --- Settings -------------------------------------------------------------------------------


def test_the_per_user_stream_limit_defaults_to_16_and_can_be_set() -> None:
    assert ChatSettings.from_env(Env(BASE_ENV)).max_streams_per_user == 16
    env = {**BASE_ENV, "PARLEY_CHAT_MAX_STREAMS_PER_USER": "3"}
    assert ChatSettings.from_env(Env(env)).max_streams_per_user == 3


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "1000001"])
def test_a_bad_per_user_stream_limit_is_a_one_line_config_error(value: str) -> None:
    env = {**BASE_ENV, "PARLEY_CHAT_MAX_STREAMS_PER_USER": value}
    with pytest.raises(ConfigError) as caught:
        ChatSettings.from_env(Env(env))
    assert caught.value.variable == "PARLEY_CHAT_MAX_STREAMS_PER_USER"
    assert str(caught.value).startswith("PARLEY_CHAT_MAX_STREAMS_PER_USER: ")
    assert "\n" not in str(caught.value)


# --- Resume points and texts ----------------------------------------------------------------


def _expected_resume(value: str) -> int | None:
    """What the server must make of `value`: a number, or None for 'invalid'."""
    if not value or any(c not in "0123456789" for c in value):
        return None
    digits = value.lstrip("0") or "0"
    if len(digits) > 19:
        return None
    number = int(digits)
    return number if number <= MAX_SEQUENCE else None


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text("0123456789", max_size=30),
        st.integers(1, 6000).map(lambda n: "4" * n),
        st.builds(lambda z, n: "0" * z + str(n), st.integers(0, 5000), st.integers(0, 2**64)),
    )
)
def test_any_string_is_a_resume_point_or_invalid_argument(value: str) -> None:
    if value == "":
        assert _resume_point(value) is None
        return
    expected = _expected_resume(value)
    if expected is None:
        with pytest.raises(InvalidArgument) as caught:
            _resume_point(value)
        assert caught.value.violations[0].field == RESUME_KEY
    else:
        assert _resume_point(value) == expected


@pytest.mark.parametrize(
    "value",
    ["4" * 4400, "9" * 20, "9223372036854775808", "٣", "²", "１", "+1", "1_000", " 1", "1\n"],
)
def test_resume_points_that_once_passed_or_crashed_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument):
        _resume_point(value)


def test_leading_zeros_do_not_make_a_resume_point_too_long() -> None:
    assert _resume_point("0" * 5000 + "42") == 42
    assert _resume_point("0" * 30 + str(MAX_SEQUENCE)) == MAX_SEQUENCE


CONTROLS = [chr(c) for c in [*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]]


@pytest.mark.parametrize("control", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_a_text_with_a_control_character_is_invalid_argument_naming_text(control: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_text(f"hello {control} there")
    assert [v.field for v in caught.value.violations] == ["text"]
    assert f"U+{ord(control):04X} at character 7" in caught.value.message


def test_tab_newline_and_other_characters_are_fine_in_a_text() -> None:
    for text in ["a\tb\nc", "no\u00a0break", "a\u2028b\u2029c", "e\u0301", "👨\u200d👩", "\ufeff."]:
        check_text(text)


# --- The sender's budget in Postgres --------------------------------------------------------


@pytest.fixture
async def store_for(database: str) -> AsyncIterator[Callable[[float, int], MessageStore]]:
    """`store_for(rate, burst)`: a MessageStore on the test's database with that budget."""
    db = Database(DatabaseSettings(database, 1, 10, 5), application_name="chat-test")
    await db.open()
    try:
        yield lambda rate, burst: MessageStore(db, rate=rate, burst=burst)
    finally:
        await db.close()


async def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def open_room(url: str, room: str) -> int:
    """Makes `room` (public) unless it exists; its access version, as a stream is checked at.
    Two statements: in one, a row another transaction had just added would not be seen."""
    await sql(
        url, "INSERT INTO chat_rooms (name) VALUES (%s) ON CONFLICT DO NOTHING RETURNING 1", room
    )
    rows = await sql(url, "SELECT access_version FROM chat_rooms WHERE name = %s", room)
    return int(rows[0][0])


async def appended(store: MessageStore, database: str, room: str, user: int, *args: str) -> str:
    """Sends as a stream checked at the room's current version would; the outcome."""
    version = await open_room(database, room)
    result = await store.append(room, user, *args, version=version, timeout=5)
    return result.outcome


async def test_a_burst_then_refusals_and_resends_spend_too(store_for, database) -> None:
    store = store_for(0.5, 4)  # one message every 2 s: nothing refills during the test
    version = await open_room(database, "budget")

    async def send(user: int, name: str, text: str, client_id: str) -> Appended:
        return await store.append("budget", user, name, text, client_id, version=version, timeout=5)

    for i in range(3):
        assert (await send(7, "Ada", f"m{i}", f"id{i}")).outcome == "new"
    # A resend of a stored message is answered with it, and spends like any send: a client
    # resending one id in a loop costs a statement each time.
    resent = await send(7, "Ada", "m1", "id1")
    assert resent.outcome == "resent" and resent.message is not None
    assert resent.message.sequence == 2
    assert (await send(7, "Ada", "m3", "id3")).outcome == "rate"
    assert (await send(7, "Ada", "no id", "")).outcome == "rate"
    assert (await send(7, "Ada", "m1", "id1")).outcome == "rate"
    # Someone else has a budget of their own; the room's sequence has no gaps.
    other = await send(8, "Grace", "hello", "g1")
    assert other.outcome == "new" and other.message is not None and other.message.sequence == 4
    rows = await sql(database, "SELECT user_id, text FROM chat_messages ORDER BY sequence")
    assert rows == [(7, "m0"), (7, "m1"), (7, "m2"), (8, "hello")]


async def test_a_send_checked_at_an_older_access_version_stores_nothing(
    store_for, database
) -> None:
    store = store_for(100, 100)
    version = await open_room(database, "changed")
    first = await store.append("changed", 7, "Ada", "before", "", version=version, timeout=5)
    assert first.outcome == "new" and first.version == version
    # A membership change elsewhere gives the room a new access version.
    await sql(
        database,
        "UPDATE chat_rooms SET access_version = nextval('chat_access_versions')"
        " WHERE name = 'changed' RETURNING 1",
    )
    stale = await store.append("changed", 7, "Ada", "after", "", version=version, timeout=5)
    assert stale == Appended("stale", None, 0)
    gone = await store.append("no-such-room", 7, "Ada", "x", "", version=version, timeout=5)
    assert gone.outcome == "stale"
    rows = await sql(database, "SELECT room, sequence, text FROM chat_messages")
    assert rows == [("changed", 1, "before")]
    (last,), *_ = await sql(database, "SELECT last_sequence FROM chat_rooms WHERE name = 'changed'")
    assert last == 1  # no number was taken


async def test_concurrent_sends_of_one_user_share_one_budget(store_for, database) -> None:
    rate, burst = 2.0, 5
    store = store_for(rate, burst)

    async def send(stream: int) -> int:
        stored = 0
        for i in range(10):
            room = f"room-{stream % 3}"  # several rooms too: the budget is the user's
            if await appended(store, database, room, 9, "Ada", "x", f"{stream}-{i}") == "new":
                stored += 1
        return stored

    stored = sum(await asyncio.gather(*(send(n) for n in range(8))))
    (count, span), *_ = await sql(
        database,
        "SELECT count(*), coalesce(extract(epoch FROM max(create_time) - min(create_time)), 0)"
        " FROM chat_messages WHERE user_id = 9",
    )
    assert stored == count
    # Postgres' now() is the budget's clock and each row's create_time: the bound is exact.
    assert burst <= count <= burst + rate * float(span) + 1, (count, span)


async def test_the_budget_refills_at_the_rate(store_for, database, wait_for) -> None:
    rate = 4.0
    store = store_for(rate, 1)  # one at a time, one every 250 ms

    async def allowed() -> bool:
        return await appended(store, database, "refill", 11, "Ada", "x", "") == "new"

    for _ in range(3):
        await wait_for(allowed, 10, "the budget to refill")
    rows = await sql(
        database,
        "SELECT extract(epoch FROM create_time) FROM chat_messages WHERE room = 'refill'"
        " ORDER BY sequence",
    )
    times = [float(row[0]) for row in rows]
    # Refused in between, as often as the polling asked: exactly 1/rate apart at least.
    assert len(times) == 3
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert all(gap >= 1 / rate - 1e-6 for gap in gaps), gaps


# --- Catch-up pages cut by size -------------------------------------------------------------


async def fill(url: str, room: str, sizes: list[int]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO chat_rooms (name, last_sequence) VALUES (%s, %s)", (room, len(sizes))
        )
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO chat_messages (room, sequence, user_id, user_name, text)"
                " VALUES (%s, %s, 1, 'Ada', %s)",
                [
                    (room, n, "é" * (size // 2) + "x" * (size % 2))
                    for n, size in enumerate(sizes, 1)
                ],
            )


async def test_a_page_ends_with_the_message_that_reaches_max_bytes(store_for, database) -> None:
    sizes = [1000, 3000, 4096, 2, 4096, 4096, 1]
    await fill(database, "pages", sizes)
    store = store_for(1, 1)
    page = await store.page("pages", reader=1, after=0, size=100, max_bytes=8000)
    assert [m.sequence for m in page.messages] == [1, 2, 3]  # 1000 + 3000 < 8000 <= 8096
    assert page.more and page.allowed and page.last_sequence == len(sizes)
    page = await store.page("pages", reader=1, after=3, size=100, max_bytes=8000)
    assert [m.sequence for m in page.messages] == [4, 5, 6]

    # One message larger than the budget still makes a page; the count limit still holds.
    async def sequences(after: int, size: int, max_bytes: int) -> list[int]:
        page = await store.page("pages", reader=1, after=after, size=size, max_bytes=max_bytes)
        return [m.sequence for m in page.messages]

    assert await sequences(2, 100, 10) == [3]
    assert await sequences(0, 2, 10**6) == [1, 2]
    assert await sequences(7, 100, 10) == []
    unbounded, stamp = await store.after("pages", 0, 100)
    assert [len(m.text.encode()) for m in unbounded] == sizes
    assert stamp is not None and await store.after("no-such-room", 0, 100) == ([], None)


async def test_a_resumed_stream_gets_every_message_across_pages_cut_by_size(
    make_stack, chat, database, wait_for
) -> None:
    # Sizes that put page ends everywhere: exactly at 64 KiB (16 x 4096), just under and over.
    sizes = [4096] * 16 + [4095, 1, 4096] * 30 + [1] * 250 + [3000, 4096] * 40
    stack = await make_stack(replicas=1, people=("Ada",), in_process=True)
    await fill(stack.database, "catch-up", sizes)
    client = await chat(stack.people["Ada"], stack.replicas[0], room="catch-up", resume_after=0)
    await wait_for(lambda: len(client.received) >= len(sizes) or client.ended, 30, "the replay")
    assert client.error is None
    assert client.sequences == list(range(1, len(sizes) + 1))
    assert [len(m.text.encode()) for m in client.received] == sizes
    # Live messages follow the replay without a gap.
    await client.send("live")
    await wait_for(lambda: len(client.received) > len(sizes), 10, "the live message")
    assert client.received[-1].sequence == len(sizes) + 1


@pytest.mark.parametrize("size", [500, 7])
async def test_history_pages_are_cut_by_size_and_page_through_everything(
    store_for, database, size: int
) -> None:
    """A ListMessages page ends at about MAX_PAGE_BYTES of text, says there is more, and
    paging on (forwards and backwards) gives every message once, in order."""
    store = store_for(100000, 100000)
    text = "y" * 4096
    count = 150  # 600 KiB of text: more than two pages of 256 KiB
    for i in range(count):
        assert await appended(store, database, "history", 5, "Ada", text, f"h{i}") == "new"
    forwards: list[int] = []
    after, more = 0, True
    while more:
        found = await store.page(
            "history", reader=5, after=after, size=size, max_bytes=MAX_PAGE_BYTES
        )
        page, more = found.messages, found.more
        assert page, "a page that says more is coming came empty"
        assert len(page) <= size
        assert sum(len(m.text) for m in page) < MAX_PAGE_BYTES + len(text)
        forwards += [m.sequence for m in page]
        after = page[-1].sequence
    assert forwards == list(range(1, count + 1))
    backwards: list[int] = []
    before, more = count + 1, True
    while more:
        found = await store.page(
            "history", reader=5, before=before, size=size, max_bytes=MAX_PAGE_BYTES
        )
        page, more = found.messages, found.more
        assert page and len(page) <= size
        backwards = [m.sequence for m in page] + backwards
        before = page[0].sequence
    assert backwards == list(range(1, count + 1))
