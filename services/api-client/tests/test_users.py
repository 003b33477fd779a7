"""UserClient and AsyncUserClient against the real UserService: every method, paging, import."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pytest

from parley.client import (
    AlreadyExists,
    AsyncUserClient,
    HealthStatus,
    InvalidArgument,
    NewUser,
    NotFound,
    UserClient,
)
from parley.proto import user_pb2

if TYPE_CHECKING:
    from conftest import RunningStack

Email = Callable[[str], str]


def test_create_get_update_delete(stack: RunningStack, email: Email) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users:
        address = email("ada")
        ada = users.create_user(name="Ada", email=address, age=36)
        assert ada.id > 0
        assert (ada.name, ada.email, ada.age) == ("Ada", address, 36)
        assert ada.create_time.seconds > 0

        assert users.get_user(ada.id) == ada

        changed = users.update_user(ada.id, age=37)
        assert (changed.name, changed.email, changed.age) == ("Ada", address, 37)
        renamed = users.update_user(ada.id, name="Ada L.")
        assert (renamed.name, renamed.age) == ("Ada L.", 37), "fields not given must stay"

        users.delete_user(ada.id)
        with pytest.raises(NotFound):
            users.get_user(ada.id)
        with pytest.raises(NotFound):
            users.delete_user(ada.id)


def test_update_needs_a_field(stack: RunningStack) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users, pytest.raises(ValueError):
        users.update_user(1)


async def test_async_create_get_update_delete(stack: RunningStack, email: Email) -> None:
    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        address = email("grace")
        grace = await users.create_user(name="Grace", email=address, age=45)
        assert await users.get_user(grace.id) == grace
        updated = await users.update_user(grace.id, email=address.upper(), name="Grace H.")
        assert (updated.name, updated.email, updated.age) == ("Grace H.", address.upper(), 45)
        await users.delete_user(grace.id)
        with pytest.raises(NotFound):
            await users.get_user(grace.id)


def _import_rows(prefix: str, count: int) -> list[NewUser]:
    return [NewUser(f"{prefix} {i}", f"{prefix}-{i}@example.com", i % 100) for i in range(count)]


def test_paging_sees_every_user_once_in_order(stack: RunningStack, email: Email) -> None:
    prefix = f"page-{uuid.uuid4().hex[:10]}"
    with UserClient(stack.user, token=stack.admin_token) as users:
        reply = users.import_users(_import_rows(prefix, 250))
        assert (reply.created_count, reply.failed_count) == (250, 0)

        everyone = list(users.list_users(page_size=7))
        ids = [u.id for u in everyone]
        assert ids == sorted(set(ids)), "ids must ascend with no duplicate"
        mine = [u for u in everyone if u.email.startswith(f"{prefix}-")]
        assert [u.email for u in mine] == [f"{prefix}-{i}@example.com" for i in range(250)]

        first = users.list_users_page(page_size=7)
        assert len(first.users) == 7 and first.has_more
        second = users.list_users_page(page_size=7, page_token=first.next_page_token)
        assert second.users[0].id > first.users[-1].id


async def test_async_paging_in_order(stack: RunningStack, email: Email) -> None:
    prefix = f"apage-{uuid.uuid4().hex[:10]}"
    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        reply = await users.import_users(_import_rows(prefix, 250))
        assert reply.created_count == 250
        everyone = [user async for user in users.list_users(page_size=7)]
        ids = [u.id for u in everyone]
        assert ids == sorted(set(ids))
        mine = [u.email for u in everyone if u.email.startswith(f"{prefix}-")]
        assert mine == [f"{prefix}-{i}@example.com" for i in range(250)]


def test_last_page_has_no_token(stack: RunningStack, email: Email) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users:
        users.create_user(name="Last", email=email("last"), age=1)
        pages = 0
        token = ""
        while True:
            page = users.list_users_page(page_size=1000, page_token=token)
            pages += 1
            if not page.has_more:
                break
            token = page.next_page_token
        assert page.next_page_token == ""
        assert pages >= 1


def test_import_reports_bad_rows_and_keeps_good_ones(stack: RunningStack, email: Email) -> None:
    taken = email("taken")
    good = email("good")
    progress: list[int] = []
    with UserClient(stack.user, token=stack.admin_token) as users:
        users.create_user(name="Taken", email=taken, age=20)
        reply = users.import_users(
            [
                NewUser("Good", good, 30),
                NewUser("", email("noname"), 30),
                user_pb2.CreateUserRequest(name="Dup", email=taken.upper(), age=30),
                NewUser("Old", email("old"), 151),
            ],
            on_progress=progress.append,
        )
        assert (reply.created_count, reply.failed_count) == (1, 3)
        assert [(e.index, e.code, e.field) for e in reply.errors] == [
            (1, "INVALID_ARGUMENT", "name"),
            (2, "ALREADY_EXISTS", "email"),
            (3, "INVALID_ARGUMENT", "age"),
        ]
        assert progress == [1, 2, 3, 4]
        assert [u.email for u in users.list_users() if u.email == good] == [good]


async def test_async_import_from_an_async_iterable(stack: RunningStack, email: Email) -> None:
    prefix = f"aimport-{uuid.uuid4().hex[:10]}"

    async def rows() -> AsyncIterator[NewUser]:
        for row in _import_rows(prefix, 5):
            yield row

    progress: list[int] = []
    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        reply = await users.import_users(rows(), on_progress=progress.append)
        assert (reply.created_count, reply.failed_count) == (5, 0)
        assert progress == [1, 2, 3, 4, 5]
        bad = await users.import_users([NewUser("x", "not-an-email", 1)])
        assert (bad.created_count, bad.failed_count) == (0, 1)
        assert bad.errors[0].field == "email"


def test_errors_of_user_calls(stack: RunningStack, email: Email) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users:
        address = email("dup")
        users.create_user(name="Dup", email=address, age=1)
        with pytest.raises(AlreadyExists) as exists:
            users.create_user(name="Dup 2", email=address.upper(), age=1)
        assert "email" in exists.value.hint
        with pytest.raises(NotFound) as missing:
            users.get_user(2_000_000_000)
        assert missing.value.target == stack.user
        assert missing.value.method == "/user.UserService/GetUser"
        with pytest.raises(InvalidArgument) as invalid:
            users.create_user(name=" ", email="nope", age=200)
        assert set(invalid.value.fields) == {"name", "email", "age"}
        assert all(description for _, description in invalid.value.field_violations)
        with pytest.raises(InvalidArgument) as bad_id:
            users.get_user(0)
        assert bad_id.value.fields == ["id"]


def test_health(stack: RunningStack) -> None:
    # Health needs no token.
    with UserClient(stack.user) as users:
        assert users.health() is HealthStatus.SERVING
        assert users.health("") is HealthStatus.SERVING
        with pytest.raises(NotFound):
            users.health("no.such.Service")


async def test_async_health(stack: RunningStack) -> None:
    async with AsyncUserClient(stack.user) as users:
        assert await users.health() is HealthStatus.SERVING
        assert await users.health("", wait_for_ready=True) is HealthStatus.SERVING


def test_a_client_is_shared_between_threads(stack: RunningStack, email: Email) -> None:
    with UserClient(stack.user, token=stack.admin_token) as users:
        created = users.create_user(name="Shared", email=email("shared"), age=2)
        seen: list[int] = []
        lock = threading.Lock()

        def read() -> None:
            for _ in range(10):
                user = users.get_user(created.id)
                with lock:
                    seen.append(user.id)

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert seen == [created.id] * 40


async def test_async_calls_run_concurrently(stack: RunningStack, email: Email) -> None:
    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        made = await asyncio.gather(
            *(users.create_user(name=f"C{i}", email=email("conc"), age=i) for i in range(10))
        )
        fetched = await asyncio.gather(*(users.get_user(u.id) for u in made))
        assert fetched == made


async def test_an_import_whose_rows_fail_partway_stores_nothing(
    stack: RunningStack, email: Email
) -> None:
    """The SDK declares its commit: an import cut short before its last row (here, its row
    iterator raises after two rows reached the server) stores none of them, on every try."""
    prefix = f"cut-{uuid.uuid4().hex[:10]}"

    async def rows(attempt: int) -> AsyncIterator[user_pb2.CreateUserRequest]:
        for index in range(2):
            # A row's own commit is dropped: the SDK sends the import's after the last row.
            yield user_pb2.CreateUserRequest(
                name="Cut", email=f"{prefix}.{attempt}.{index}@example.com", age=1, commit=True
            )
        raise RuntimeError("the source of the rows failed")

    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        for attempt in range(10):
            # The SDK cancels the call and raises the iterator's own error.
            with pytest.raises(RuntimeError, match="the source of the rows failed"):
                await users.import_users(rows(attempt))
        stored = [u.email async for u in users.list_users() if u.email.startswith(prefix)]
        assert stored == []
        # The same rows with no failure are stored: a row's `commit` did not end the import.
        reply = await users.import_users(
            [NewUser("Whole", f"{prefix}.whole.{i}@example.com", 1) for i in range(3)]
        )
        assert (reply.created_count, reply.failed_count) == (3, 0)
