"""The bearer token on every call pattern, from an argument, PARLEY_TOKEN or a provider."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from parley.client import (
    AsyncChatClient,
    AsyncUserClient,
    ChatClient,
    NewUser,
    PermissionDenied,
    RefreshingToken,
    Unauthenticated,
    UserClient,
)
from parley.client.tokens import mint_token, token_expiry

if TYPE_CHECKING:
    from conftest import Person, RunningStack


class CountingProvider:
    """A token provider that counts how often it is asked."""

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.make()


def _rows() -> list[NewUser]:
    return [NewUser("Row", f"row-{uuid.uuid4().hex[:12]}@example.com", 3)]


def test_sync_token_on_all_four_call_patterns(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    writer = person("Writer")
    provider = CountingProvider(lambda: stack.token(str(writer.id), ("users:write",)))
    with (
        UserClient(stack.user, token=provider) as users,
        ChatClient(stack.chat, token=provider) as chat,
    ):
        assert users.get_user(writer.id).id == writer.id  # unary-unary
        assert users.list_users_page(page_size=1).users  # unary-stream
        assert users.import_users(_rows()).created_count == 1  # stream-unary
        [posted] = chat.post(room, "hello")  # stream-stream
        assert posted.user_id == writer.id and posted.text == "hello"
    assert provider.calls == 4, "one token per call"

    with UserClient(stack.user) as users, ChatClient(stack.chat) as chat:
        for call in (
            lambda: users.get_user(writer.id),
            lambda: users.list_users_page(page_size=1),
            lambda: users.import_users(_rows()),
            lambda: chat.post(room, "hello"),
        ):
            with pytest.raises(Unauthenticated):
                call()


async def test_async_token_on_all_four_call_patterns(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    writer = person("Writer")
    provider = CountingProvider(lambda: stack.token(str(writer.id), ("users:write",)))
    async with (
        AsyncUserClient(stack.user, token=provider) as users,
        AsyncChatClient(stack.chat, token=provider) as chat,
    ):
        assert (await users.get_user(writer.id)).id == writer.id
        assert (await users.list_users_page(page_size=1)).users
        assert (await users.import_users(_rows())).created_count == 1
        [posted] = await chat.post(room, "hello")  # a ListMessages call, then the stream
        assert posted.user_id == writer.id
        assert provider.calls == 5
        async with chat.session(room) as session:
            stored = await session.wait_stored(await session.send("from a session"), timeout=10)
            assert stored.sequence == posted.sequence + 1
        assert provider.calls == 7

    async with AsyncUserClient(stack.user) as users, AsyncChatClient(stack.chat) as chat:
        with pytest.raises(Unauthenticated):
            await users.get_user(writer.id)
        with pytest.raises(Unauthenticated):
            await users.list_users_page(page_size=1)
        with pytest.raises(Unauthenticated):
            await users.import_users(_rows())
        with pytest.raises(Unauthenticated):
            await chat.post(room, "hello")
        with pytest.raises(Unauthenticated):
            await chat.session(room).open()


async def test_a_refused_import_keeps_its_status_every_time(
    stack: RunningStack, person: Callable[[str], Person]
) -> None:
    """The server refuses an import before reading a row; the client never sees INTERNAL.

    grpcio's asyncio client reports a write into a call the server has just ended as INTERNAL
    "Internal error from Core"; the SDK waits for the import's headers, which the server sends
    only once it admitted the call. Repeated, because the race it closes is a matter of timing.
    """
    reader = person("Reader")
    rows = [NewUser("Row", f"refused-{uuid.uuid4().hex[:12]}@example.com", 3) for _ in range(50)]
    async with (
        AsyncUserClient(stack.user) as anonymous,
        AsyncUserClient(stack.user, token=stack.token(str(reader.id))) as no_scope,
    ):
        for _ in range(60):
            with pytest.raises(Unauthenticated) as missing:
                await anonymous.import_users(rows)
            with pytest.raises(PermissionDenied) as denied:
                await no_scope.import_users(rows)
        # Refused before its headers went out, a call carries its request id in its trailers.
        assert missing.value.request_id and denied.value.request_id
    with UserClient(stack.user) as sync_anonymous:
        for _ in range(20):
            with pytest.raises(Unauthenticated):
                sync_anonymous.import_users(rows)
    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        stored = [u async for u in users.list_users() if u.email.startswith("refused-")]
    assert [u for u in stored if u.email in {r.email for r in rows}] == []


def test_token_from_the_environment(stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_TOKEN", stack.admin_token)
    with UserClient(stack.user) as users:
        created = users.create_user(name="Env", email=f"env-{uuid.uuid4().hex}@x.io", age=5)
        assert users.get_user(created.id) == created
    # An explicit token wins over the variable.
    with UserClient(stack.user, token=stack.token("2")) as users, pytest.raises(Exception) as e:
        users.create_user(name="Env", email=f"env-{uuid.uuid4().hex}@x.io", age=5)
    assert type(e.value).__name__ == "PermissionDenied"


def test_refreshing_token_asks_again_before_expiry(stack: RunningStack) -> None:
    now = [time.time()]
    provider = CountingProvider(
        lambda: mint_token(stack.jwt_secret, "1", ("users:write",), ttl=120)
    )
    token = RefreshingToken(provider, margin=30, clock=lambda: now[0])
    with UserClient(stack.user, token=token) as users:
        created = users.create_user(name="Fresh", email=f"f-{uuid.uuid4().hex}@x.io", age=1)
        for _ in range(5):
            users.get_user(created.id)
        assert provider.calls == 1, "a token far from expiry is reused"
        expiry = token.expires_at
        assert expiry is not None

        now[0] = expiry - 31  # not yet within the margin
        users.get_user(created.id)
        assert provider.calls == 1
        now[0] = expiry - 29  # within 30 s of exp: refreshed before it expires
        users.get_user(created.id)
        assert provider.calls == 2
        now[0] = time.time()  # the new token is far from its expiry again
        users.get_user(created.id)
        assert provider.calls == 2

        token.invalidate()
        users.get_user(created.id)
        assert provider.calls >= 3


def test_a_token_without_expiry_is_not_cached() -> None:
    provider = CountingProvider(lambda: "opaque-token")
    token = RefreshingToken(provider)
    assert token() == token() == "opaque-token"
    assert provider.calls == 2
    assert token_expiry("opaque-token") is None
    assert "opaque" not in repr(token)


def test_tokens_stay_out_of_reprs(stack: RunningStack) -> None:
    secret_token = stack.admin_token
    with UserClient(stack.user, token=secret_token) as users:
        assert secret_token not in repr(users)
