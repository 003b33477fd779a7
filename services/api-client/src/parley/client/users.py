"""Clients for UserService: `UserClient` (sync) and `AsyncUserClient` (asyncio).

    with UserClient("localhost:50051", token=token) as users:
        ada = users.create_user(name="Ada", email="ada@example.com", age=36)
        for user in users.list_users():          # every user, page after page
            print(user.id, user.name)

Methods return the generated messages (`parley.proto.user_pb2.User`, ...), typed by their
stubs, or small frozen dataclasses where the proto has no message (`UserPage`). Every call has
a deadline (the client's `timeout`, 10 s unless changed, or the call's own `timeout=`) and
raises a `parley.client.errors.ParleyError` subclass when it fails. GetUser, ListUsers and
health checks are retried on UNAVAILABLE; writes are not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from parley.client._base import AsyncClientBase, SyncClientBase
from parley.client._channel import USER_SERVICE
from parley.proto import user_pb2, user_pb2_grpc
from parley.proto.contract import (
    EXPLICIT_IMPORT_COMMIT,
    IMPORT_COMMIT_KEY,
    NEXT_PAGE_TOKEN_KEY,
    REQUEST_ID_KEY,
)

__all__ = [
    "AsyncUserClient",
    "ImportRow",
    "NewUser",
    "ProgressCallback",
    "UserClient",
    "UserPage",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class NewUser:
    """One user to create with `import_users`."""

    name: str
    email: str
    age: int = 0


@dataclass(frozen=True)
class UserPage:
    """One page of `list_users_page`: the users, and the token of the next page."""

    users: tuple[user_pb2.User, ...]
    """The users of the page, by ascending id."""
    next_page_token: str
    """Pass it as `page_token` for the next page; empty after the last page."""

    @property
    def has_more(self) -> bool:
        """True when another page follows."""
        return bool(self.next_page_token)


ImportRow: TypeAlias = NewUser | user_pb2.CreateUserRequest
"""A row of `import_users`: a `NewUser` or a ready `CreateUserRequest`."""

ProgressCallback: TypeAlias = Callable[[int], None]
"""Called by `import_users` with the number of rows handed to gRPC so far."""


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")


def _next_token(trailing: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in trailing or ():
        if key == NEXT_PAGE_TOKEN_KEY:
            return value if isinstance(value, str) else bytes(value).decode()
    return ""


def _update_request(
    user_id: int, name: str | None, email: str | None, age: int | None
) -> user_pb2.UpdateUserRequest:
    given = {"name": name, "email": email, "age": age}
    paths = [field for field, value in given.items() if value is not None]
    if not paths:
        # The server reads an empty mask as "every non-default field": never send one.
        raise ValueError("update_user needs at least one of name, email, age")
    user = user_pb2.User(id=user_id)
    if name is not None:
        user.name = name
    if email is not None:
        user.email = email
    if age is not None:
        user.age = age
    return user_pb2.UpdateUserRequest(user=user, update_mask=field_mask_pb2.FieldMask(paths=paths))


# Declares that the import ends with a `commit` message: a call cut short before it stores
# nothing, whatever the timing (see ImportUsers in user.proto).
_DECLARE_COMMIT = ((IMPORT_COMMIT_KEY, EXPLICIT_IMPORT_COMMIT),)
_COMMIT = user_pb2.CreateUserRequest(commit=True)


def _row_request(row: ImportRow) -> user_pb2.CreateUserRequest:
    if isinstance(row, user_pb2.CreateUserRequest) and not row.commit:
        return row
    # A row's own `commit` is dropped: the import's commit message comes after the last row.
    return user_pb2.CreateUserRequest(name=row.name, email=row.email, age=row.age)


def _sync_rows(
    rows: Iterable[ImportRow], on_progress: ProgressCallback | None
) -> Iterator[user_pb2.CreateUserRequest]:
    sent = 0
    for row in rows:
        yield _row_request(row)
        # Resumed when gRPC takes the next row, so the previous one is on its way.
        sent += 1
        if on_progress is not None:
            on_progress(sent)
    yield _COMMIT


async def _async_rows(
    rows: Iterable[ImportRow] | AsyncIterable[ImportRow], on_progress: ProgressCallback | None
) -> AsyncGenerator[user_pb2.CreateUserRequest, None]:
    sent = 0
    if isinstance(rows, AsyncIterable):
        async for row in rows:
            yield _row_request(row)
            sent += 1
            if on_progress is not None:
                on_progress(sent)
    else:
        for row in rows:
            yield _row_request(row)
            sent += 1
            if on_progress is not None:
                on_progress(sent)
    yield _COMMIT


_ImportCall: TypeAlias = grpc.aio.StreamUnaryCall[
    user_pb2.CreateUserRequest, user_pb2.ImportUsersResponse
]


async def _send_and_wait(
    call: _ImportCall, requests: AsyncGenerator[user_pb2.CreateUserRequest, None]
) -> user_pb2.ImportUsersResponse:
    """Writes the requests while waiting for the answer, which may come first (a deadline,
    a refusal); when the requests' source fails, the call is cancelled and its error raised."""
    writer = asyncio.create_task(_write_rows(call, requests))
    try:
        return await call
    except (grpc.RpcError, asyncio.CancelledError):
        failure = writer.exception() if writer.done() and not writer.cancelled() else None
        if failure is not None:
            raise failure from None
        raise
    finally:
        if not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer


async def _write_rows(
    call: _ImportCall, requests: AsyncGenerator[user_pb2.CreateUserRequest, None]
) -> None:
    """Writes every request and half-closes, unless the server ends the call first."""
    try:
        async with contextlib.aclosing(requests):
            async for request in requests:
                try:
                    await call.write(request)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the server ended the call: awaiting it gives the status
        await call.done_writing()
    except BaseException:
        call.cancel()  # the rows' source failed (or this task was cancelled): so does the call
        raise


class UserClient(SyncClientBase):
    """A sync client of UserService.

    `target` is `host:port`, `dns:///host:port` (round_robin over every address), several
    addresses separated by commas (tried in turn), or None for `$PARLEY_USER_ADDR`, else
    `localhost:50051`. `token` is the bearer token, or a `TokenProvider` called on every call
    (wrap it in `RefreshingToken` to cache), or None for `$PARLEY_TOKEN`. `timeout` is the
    default deadline of every call in seconds. `wait_for_ready=True` makes calls wait (up to
    their deadline) for an unreachable server instead of failing at once with `Unavailable`:
    useful for scripts that run while the stack starts, wrong for interactive use. `tls` is
    False (plain text), True (TLS with the system's roots) or `grpc.ChannelCredentials`.
    `options` are extra gRPC channel arguments. `tracer_provider` makes a CLIENT span of every
    call, its W3C trace context sent along; None uses the application's global provider when it
    has installed one, and traces nothing otherwise (see `parley.client`).

    Use it as a context manager, or call `close()`. Safe to share between threads.
    """

    _service = USER_SERVICE

    def _stub(self, channel: grpc.Channel) -> user_pb2_grpc.UserServiceStub:
        return user_pb2_grpc.UserServiceStub(channel)

    def get_user(
        self, user_id: int, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> user_pb2.User:
        """The user with this id. Raises `NotFound`, or `InvalidArgument` for an id below 1."""
        deadline = self._deadline(timeout)
        request = user_pb2.GetUserRequest(id=user_id)
        reply = self._call(
            "GetUser",
            deadline,
            lambda ch: self._stub(ch).GetUser(
                request, timeout=deadline, wait_for_ready=self._ready(wait_for_ready)
            ),
            idempotent=True,
        )
        return reply.user

    def list_users_page(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> UserPage:
        """One page of users by ascending id, starting after `page_token` (the first page when
        empty). Keyset paging: every page costs the same, however deep."""
        _check_page_size(page_size)
        deadline = self._deadline(timeout)
        request = user_pb2.ListUsersRequest(page_size=page_size, page_token=page_token)

        def invoke(channel: grpc.Channel) -> UserPage:
            call = self._stub(channel).ListUsers(
                request, timeout=deadline, wait_for_ready=self._ready(wait_for_ready)
            )
            users = tuple(call)
            return UserPage(users, _next_token(call.trailing_metadata()))

        return self._call("ListUsers", deadline, invoke, idempotent=True)

    def list_users(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> Iterator[user_pb2.User]:
        """Every user, by ascending id, fetched `page_size` at a time as the iteration goes.

        Each page is one call with its own deadline. Users created while the iteration runs
        are seen when their id is above the current page.
        """
        _check_page_size(page_size)
        token = ""
        while True:
            page = self.list_users_page(
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                wait_for_ready=wait_for_ready,
            )
            yield from page.users
            if not page.has_more:
                return
            token = page.next_page_token

    def create_user(
        self, *, name: str, email: str, age: int = 0, timeout: float | None = None
    ) -> user_pb2.User:
        """Create a user and return it with its id. Needs the `users:write` scope.

        Raises `AlreadyExists` when the email is taken and `InvalidArgument` (with
        `field_violations`) when a field breaks a rule. Not retried.
        """
        deadline = self._deadline(timeout)
        request = user_pb2.CreateUserRequest(name=name, email=email, age=age)
        reply = self._call(
            "CreateUser",
            deadline,
            lambda ch: self._stub(ch).CreateUser(request, timeout=deadline),
            idempotent=False,
        )
        return reply.user

    def update_user(
        self,
        user_id: int,
        *,
        name: str | None = None,
        email: str | None = None,
        age: int | None = None,
        timeout: float | None = None,
    ) -> user_pb2.User:
        """Change the given fields of a user (the others stay) and return the user as stored.

        Only the fields passed are sent in the update mask; passing none is a ValueError.
        Needs `users:write`. Raises `NotFound`, `AlreadyExists`, `InvalidArgument`.
        """
        deadline = self._deadline(timeout)
        request = _update_request(user_id, name, email, age)
        reply = self._call(
            "UpdateUser",
            deadline,
            lambda ch: self._stub(ch).UpdateUser(request, timeout=deadline),
            idempotent=False,
        )
        return reply.user

    def delete_user(self, user_id: int, *, timeout: float | None = None) -> None:
        """Delete a user. Needs `users:write`. Raises `NotFound` when there is none.

        Not retried: after a lost reply, a retry would report `NotFound` for a delete that
        worked.
        """
        deadline = self._deadline(timeout)
        request = user_pb2.DeleteUserRequest(id=user_id)
        self._call(
            "DeleteUser",
            deadline,
            lambda ch: self._stub(ch).DeleteUser(request, timeout=deadline),
            idempotent=False,
        )

    def import_users(
        self,
        rows: Iterable[ImportRow],
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> user_pb2.ImportUsersResponse:
        """Create many users in one client-streaming call; needs `users:write`.

        Rows are independent: the reply counts the created and failed rows and lists why each
        failed row failed (`errors`, by zero-based `index`). Nothing is stored when the call
        fails, is cancelled or passes its deadline before every row was sent (the import
        ends with an explicit `commit`); once they were, it may have been stored, and sending
        the same rows again reports those ALREADY_EXISTS. Give a large import a `timeout`. Rows are
        read lazily; `on_progress(sent)` is called from gRPC's sending thread as rows go out.
        Not retried.
        """
        deadline = self._deadline(timeout)
        with self._errors("ImportUsers", deadline):
            stub = self._stub(self._targets.channel())
            return stub.ImportUsers(
                _sync_rows(rows, on_progress), timeout=deadline, metadata=_DECLARE_COMMIT
            )


class AsyncUserClient(AsyncClientBase):
    """The asyncio client of UserService; the same methods as `UserClient`, awaited.

    `list_users` is an async iterator; `import_users` also takes an async iterable of rows.
    Create it inside the event loop that uses it; use `async with` or `await close()`.
    See `UserClient` for the arguments.
    """

    _service = USER_SERVICE

    def _stub(self, channel: grpc.aio.Channel) -> user_pb2_grpc.UserServiceAsyncStub:
        return user_pb2_grpc.UserServiceStub(channel)

    async def get_user(
        self, user_id: int, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> user_pb2.User:
        """The user with this id. Raises `NotFound`, or `InvalidArgument` for an id below 1."""
        deadline = self._deadline(timeout)
        request = user_pb2.GetUserRequest(id=user_id)

        async def invoke(channel: grpc.aio.Channel) -> user_pb2.GetUserResponse:
            return await self._stub(channel).GetUser(
                request, timeout=deadline, wait_for_ready=self._ready(wait_for_ready)
            )

        return (await self._call("GetUser", deadline, invoke, idempotent=True)).user

    async def list_users_page(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> UserPage:
        """One page of users by ascending id, starting after `page_token` (the first page when
        empty)."""
        _check_page_size(page_size)
        deadline = self._deadline(timeout)
        request = user_pb2.ListUsersRequest(page_size=page_size, page_token=page_token)

        async def invoke(channel: grpc.aio.Channel) -> UserPage:
            call = self._stub(channel).ListUsers(
                request, timeout=deadline, wait_for_ready=self._ready(wait_for_ready)
            )
            users = tuple([user async for user in call])
            return UserPage(users, _next_token(await call.trailing_metadata()))

        return await self._call("ListUsers", deadline, invoke, idempotent=True)

    async def list_users(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> AsyncIterator[user_pb2.User]:
        """Every user, by ascending id, fetched `page_size` at a time as the iteration goes."""
        _check_page_size(page_size)
        token = ""
        while True:
            page = await self.list_users_page(
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                wait_for_ready=wait_for_ready,
            )
            for user in page.users:
                yield user
            if not page.has_more:
                return
            token = page.next_page_token

    async def create_user(
        self, *, name: str, email: str, age: int = 0, timeout: float | None = None
    ) -> user_pb2.User:
        """Create a user and return it with its id; see `UserClient.create_user`."""
        deadline = self._deadline(timeout)
        request = user_pb2.CreateUserRequest(name=name, email=email, age=age)

        async def invoke(channel: grpc.aio.Channel) -> user_pb2.CreateUserResponse:
            return await self._stub(channel).CreateUser(request, timeout=deadline)

        return (await self._call("CreateUser", deadline, invoke, idempotent=False)).user

    async def update_user(
        self,
        user_id: int,
        *,
        name: str | None = None,
        email: str | None = None,
        age: int | None = None,
        timeout: float | None = None,
    ) -> user_pb2.User:
        """Change the given fields of a user; see `UserClient.update_user`."""
        deadline = self._deadline(timeout)
        request = _update_request(user_id, name, email, age)

        async def invoke(channel: grpc.aio.Channel) -> user_pb2.UpdateUserResponse:
            return await self._stub(channel).UpdateUser(request, timeout=deadline)

        return (await self._call("UpdateUser", deadline, invoke, idempotent=False)).user

    async def delete_user(self, user_id: int, *, timeout: float | None = None) -> None:
        """Delete a user; see `UserClient.delete_user`."""
        deadline = self._deadline(timeout)
        request = user_pb2.DeleteUserRequest(id=user_id)

        async def invoke(channel: grpc.aio.Channel) -> user_pb2.DeleteUserResponse:
            return await self._stub(channel).DeleteUser(request, timeout=deadline)

        await self._call("DeleteUser", deadline, invoke, idempotent=False)

    async def import_users(
        self,
        rows: Iterable[ImportRow] | AsyncIterable[ImportRow],
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> user_pb2.ImportUsersResponse:
        """Create many users in one client-streaming call; see `UserClient.import_users`.

        `on_progress(sent)` runs in the event loop as rows go out.
        """
        deadline = self._deadline(timeout)
        async with self._errors("ImportUsers", deadline):
            stub = self._stub(self._targets.channel())
            call = stub.ImportUsers(timeout=deadline, metadata=_DECLARE_COMMIT)
            try:
                # Parley sends an import's headers, with its request id, once it has admitted
                # the call; a call refused for its token, scope or a limit ends with trailers
                # alone, and grpcio hands over empty headers. Writing into such a call would
                # turn its status into INTERNAL in grpcio's asyncio client.
                headers = await call.initial_metadata()
                if not any(key == REQUEST_ID_KEY for key, _ in headers or ()):
                    return await call
                return await _send_and_wait(call, _async_rows(rows, on_progress))
            except asyncio.CancelledError:
                call.cancel()  # the caller was cancelled
                raise
