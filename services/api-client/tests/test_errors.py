"""Every exception class raised for real by a real server (or a real closed port), with hints."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from parley.client import (
    AsyncChatClient,
    AsyncUserClient,
    ChatClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NewUser,
    ParleyError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
    UserClient,
)
from parley.client.errors import CallContext, error_from_rpc
from parley.client.tokens import mint_token

if TYPE_CHECKING:
    from conftest import Person, RunningStack


def _one_line(error: ParleyError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_unavailable_names_the_address(unused_port: int) -> None:
    target = f"127.0.0.1:{unused_port}"
    with UserClient(target, token="t") as users, pytest.raises(Unavailable) as caught:
        users.get_user(1)
    error = caught.value
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.target == error.address == target
    assert target in error.hint and "make run" in error.hint and "PARLEY_USER_ADDR" in error.hint
    text = _one_line(error)
    assert text.startswith(f"UNAVAILABLE ({target} GetUser): ")
    assert "hint:" in text


async def test_async_unavailable_names_the_address(unused_port: int) -> None:
    target = f"127.0.0.1:{unused_port}"
    async with AsyncChatClient(target, token="t") as chat:
        with pytest.raises(Unavailable) as caught:
            await chat.presence("general")
        assert target in caught.value.hint and "PARLEY_CHAT_ADDR" in caught.value.hint
        with pytest.raises(Unavailable):
            await chat.session("general").open()


def test_the_target_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, unused_port: int
) -> None:
    monkeypatch.setenv("PARLEY_USER_ADDR", f"127.0.0.1:{unused_port}")
    with UserClient(token="t") as users:
        assert users.target == f"127.0.0.1:{unused_port}"
        with pytest.raises(Unavailable):
            users.get_user(1)
    monkeypatch.delenv("PARLEY_USER_ADDR")
    assert UserClient().target == "localhost:50051"
    assert ChatClient().target == "localhost:50052"


def test_unimplemented_at_the_wrong_service(stack: RunningStack) -> None:
    # A UserService client pointed at a chat replica.
    with UserClient(stack.chat, token=stack.admin_token) as users:
        with pytest.raises(Unimplemented) as caught:
            users.get_user(1)
    assert "make proto" in caught.value.hint and stack.chat in caught.value.hint


def test_deadline_exceeded_on_an_import_held_open(stack: RunningStack) -> None:
    release = threading.Event()

    def rows() -> Iterator[NewUser]:
        yield NewUser("Held", "held@example.com", 1)
        release.wait(30)  # never released before the deadline

    try:
        with UserClient(stack.user, token=stack.admin_token, timeout=0.5) as users:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                users.import_users(rows())
            assert time.monotonic() - started < 5
    finally:
        release.set()
    assert "0.5s" in caught.value.hint and "timeout" in caught.value.hint


async def test_async_deadline_exceeded_per_call(stack: RunningStack) -> None:
    release = asyncio.Event()

    async def rows() -> AsyncIterator[NewUser]:
        yield NewUser("Held", "held2@example.com", 1)
        await release.wait()

    async with AsyncUserClient(stack.user, token=stack.admin_token) as users:
        with pytest.raises(DeadlineExceeded) as caught:
            await users.import_users(rows(), timeout=0.3)
        release.set()
        assert "0.3s" in caught.value.hint
        # Nothing of a timed-out import is stored.
        assert not [u async for u in users.list_users() if u.email == "held2@example.com"]


def test_unauthenticated_without_a_token(stack: RunningStack) -> None:
    with UserClient(stack.user) as users, pytest.raises(Unauthenticated) as caught:
        users.get_user(1)
    assert "no token was sent" in caught.value.hint and "parley token" in caught.value.hint


def test_unauthenticated_with_an_expired_token(stack: RunningStack) -> None:
    expired = mint_token(stack.jwt_secret, "1", ttl=60, now=int(time.time()) - 3600)
    with UserClient(stack.user, token=expired) as users, pytest.raises(Unauthenticated) as caught:
        users.get_user(1)
    assert "expired" in caught.value.hint
    assert expired not in str(caught.value) and expired not in repr(caught.value)


async def test_async_unauthenticated_with_a_forged_token(stack: RunningStack) -> None:
    forged = mint_token("another-secret-" + "x" * 32, "1")
    async with AsyncUserClient(stack.user, token=forged) as users:
        with pytest.raises(Unauthenticated) as caught:
            await users.get_user(1)
    assert "parley token" in caught.value.hint


def test_permission_denied_without_the_write_scope(stack: RunningStack) -> None:
    with UserClient(stack.user, token=stack.token("2")) as users:
        with pytest.raises(PermissionDenied) as caught:
            users.create_user(name="No", email="no@example.com", age=1)
    assert "users:write" in caught.value.hint
    assert caught.value.reason  # the server's ErrorInfo reason came through


def test_chat_errors(stack: RunningStack, person: Callable[[str], Person], room: str) -> None:
    with ChatClient(stack.chat, token=stack.token("not-a-number")) as chat:
        with pytest.raises(PermissionDenied) as not_a_user:
            chat.post(room, "hello")
        assert "user id" in not_a_user.value.hint
    with ChatClient(stack.chat, token=stack.token("1999999999")) as chat:
        with pytest.raises(FailedPrecondition) as unknown:
            chat.post(room, "hello")
        assert unknown.value.reason == "UNKNOWN_SENDER"
        with pytest.raises(InvalidArgument) as bad_room:
            chat.list_messages_page("Not A Room!")
        assert bad_room.value.fields == ["room"]
        with pytest.raises(ValueError):
            chat.post(room, "   ")


def test_resource_exhausted_by_the_chat_rate_limit(
    stack: RunningStack, person: Callable[[str], Person], room: str
) -> None:
    sender = person("Fast")
    with ChatClient(stack.chat, token=sender.token) as chat:
        with pytest.raises(ResourceExhausted) as caught:
            chat.post(room, *(f"m{i}" for i in range(200)))
    assert caught.value.reason == "RATE_LIMITED"
    assert "slow down" in caught.value.hint


def test_errors_pickle(unused_port: int) -> None:
    with UserClient(f"127.0.0.1:{unused_port}") as users, pytest.raises(Unavailable) as caught:
        users.get_user(1)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is Unavailable and str(copy) == str(caught.value)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        # What grpcio reports for a connection that died mid-call, on some versions and paths.
        (grpc.StatusCode.UNKNOWN, "Stream removed", Unavailable),
        (grpc.StatusCode.UNKNOWN, "Stream removed (recvmsg:Connection reset by peer)", Unavailable),
        (grpc.StatusCode.UNKNOWN, "Exception iterating requests!", UnknownError),
        (grpc.StatusCode.ABORTED, "aborted", ParleyError),
    ],
)
def test_classification_of_reported_codes(
    code: grpc.StatusCode, details: str, expected: type[ParleyError]
) -> None:
    rpc_error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    context = CallContext("h:1", "/chat.ChatService/StreamChat", "PARLEY_CHAT_ADDR", None, True)
    error = error_from_rpc(rpc_error, context)
    assert type(error) is expected
    assert error.reported_code is code
