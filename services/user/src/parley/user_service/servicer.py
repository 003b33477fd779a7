"""UserService: the RPCs of user.proto, served from Postgres."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from parley.chassis import (
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    current_identity,
    require_scope,
)
from parley.proto import user_pb2, user_pb2_grpc

from .importing import (
    MAX_IMPORT_ERRORS,
    RowErrors,
    commits_explicitly,
    not_committed,
    receive_rows,
)
from .paging import NEXT_PAGE_TOKEN_KEY, Page, encode_token, resolve_page
from .privacy import WRITE_SCOPE, redact_for_caller, redactor
from .settings import ImportLimits
from .store import UPDATABLE_FIELDS, NewUser, UserStore
from .validation import age_problem, check, email_problem, id_problem, name_problem

__all__ = ["MAX_IMPORT_ERRORS", "WRITE_SCOPE", "UserServicer"]

# ListUsers reads a page from Postgres this many users at a time.
LIST_CHUNK = 100

_log = logging.getLogger("parley.user")

Context = grpc.aio.ServicerContext[Any, Any]


def _validated_create(
    request: user_pb2.CreateUserRequest, *also: tuple[str, str | None]
) -> NewUser:
    """The user a CreateUser request or an import row describes; `also` adds other problems."""
    check(
        ("name", name_problem(request.name)),
        ("email", email_problem(request.email)),
        ("age", age_problem(request.age)),
        *also,
    )
    return request.name.strip(), request.email.strip(), request.age


def _commit_problem(request: user_pb2.CreateUserRequest) -> tuple[str, str | None]:
    """CreateUser refuses `commit`: it ends an import, and a unary call has none to end."""
    return ("commit", "is read by ImportUsers only; leave it unset" if request.commit else None)


class UserServicer(user_pb2_grpc.UserServiceServicer):
    """Validates requests, checks scopes, and leaves storage to UserStore.

    Every User it returns goes through the caller's redactor (privacy.py): another user's
    email only for a token with users:read or users:write.
    """

    def __init__(self, store: UserStore, import_limits: ImportLimits) -> None:
        self._store = store
        self._import_limits = import_limits

    async def GetUser(
        self, request: user_pb2.GetUserRequest, context: Context
    ) -> user_pb2.GetUserResponse:
        check(("id", id_problem(request.id)))
        user = await self._store.get(request.id, timeout=context.time_remaining())
        return user_pb2.GetUserResponse(user=redact_for_caller(user))

    async def ListUsers(
        self, request: user_pb2.ListUsersRequest, context: Context
    ) -> AsyncIterator[user_pb2.User]:
        page = resolve_page(request.page, request.page_size, request.page_token)
        redact = redactor(current_identity())  # decided once per call, applied per user
        # The page is read in chunks, each read in full and its connection returned before
        # any of it is sent: no pooled connection waits on a client that reads slowly or not
        # at all, and a stream whose client stalls holds one chunk in memory, not a page.
        # The first chunk starts where the page does; the others follow it by id (keyset).
        remaining = page.size
        chunk = Page(size=min(remaining, LIST_CHUNK), after_id=page.after_id, offset=page.offset)
        last_id = 0
        while True:
            users = await self._store.list_page(chunk, timeout=context.time_remaining())
            for user in users:
                yield redact(user)
                last_id = user.id
            remaining -= chunk.size
            if not users.more or remaining == 0:
                break
            chunk = Page(size=min(remaining, LIST_CHUNK), after_id=last_id, offset=0)
        next_token = encode_token(last_id) if users.more else ""
        context.set_trailing_metadata(((NEXT_PAGE_TOKEN_KEY, next_token),))

    async def CreateUser(
        self, request: user_pb2.CreateUserRequest, context: Context
    ) -> user_pb2.CreateUserResponse:
        require_scope(WRITE_SCOPE)
        name, email, age = _validated_create(request, _commit_problem(request))
        user = await self._store.create(name, email, age, timeout=context.time_remaining())
        _log.info("created user %d", user.id)
        return user_pb2.CreateUserResponse(user=redact_for_caller(user), success=True)

    async def UpdateUser(
        self, request: user_pb2.UpdateUserRequest, context: Context
    ) -> user_pb2.UpdateUserResponse:
        require_scope(WRITE_SCOPE)
        changes = _changes(request)
        user = await self._store.update(request.user.id, changes, timeout=context.time_remaining())
        return user_pb2.UpdateUserResponse(user=redact_for_caller(user))

    async def DeleteUser(
        self, request: user_pb2.DeleteUserRequest, context: Context
    ) -> user_pb2.DeleteUserResponse:
        require_scope(WRITE_SCOPE)
        check(("id", id_problem(request.id)))
        await self._store.delete(request.id, timeout=context.time_remaining())
        _log.info("deleted user %d", request.id)
        return user_pb2.DeleteUserResponse()

    async def ImportUsers(
        self, request_iterator: AsyncIterator[user_pb2.CreateUserRequest], context: Context
    ) -> user_pb2.ImportUsersResponse:
        require_scope(WRITE_SCOPE)
        explicit = commits_explicitly(context.invocation_metadata())
        # Rows are validated as they arrive and kept in memory (at most PARLEY_IMPORT_MAX_ROWS);
        # a connection is taken only once the client has sent them all.
        received = await receive_rows(request_iterator, self._import_limits, _validated_create)
        # gRPC ends the request stream alike when the client half-closes and when the call is
        # cancelled or passes its deadline. Only `commit` says the client finished.
        if explicit and not received.committed:
            await _raise_if_cut_short(context)  # the status that names a cut-off already seen
            # A cancellation that reaches us after this point is refused as not committed:
            # the client has gone and sees neither; only this log and the metrics count it.
            _log.info("import not committed: %d row(s) received, none stored", received.count)
            raise not_committed(received)
        # A cut-off seen by now, or before the commit, stores nothing. For a client that did
        # not declare, whose half-close commits, that is all the protection there is.
        await _raise_if_cut_short(context)

        def log_import(refusals: Sequence[ServiceError | None]) -> None:
            created = sum(refusal is None for refusal in refusals)
            failed = received.invalid.count + len(refusals) - created
            _log.info("imported users: %d created, %d failed", created, failed)

        taken = RowErrors()
        if received.users:
            refusals = await self._store.insert_new(
                received.users,
                timeout=context.time_remaining(),
                before_commit=lambda: _raise_if_cut_short(context),
                on_commit=log_import,
            )
            for index, refusal in zip(received.indexes, refusals, strict=True):
                if refusal is not None:
                    taken.add(index, refusal)
        else:
            log_import([])
        errors = received.invalid.merged(taken)
        return user_pb2.ImportUsersResponse(
            created_count=len(received.users) - taken.count,
            failed_count=errors.count,
            errors=[_import_error(index, error) for index, error in errors.kept],
        )


async def _raise_if_cut_short(context: Context) -> None:
    """Raises if the call was cancelled or its deadline has passed."""
    if context.cancelled():
        raise asyncio.CancelledError()
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the import was committed")


def _changes(request: user_pb2.UpdateUserRequest) -> dict[str, object]:
    """The validated column values that the update mask selects."""
    user = request.user
    paths = list(request.update_mask.paths)
    problems: list[tuple[str, str | None]] = [("user.id", id_problem(user.id))]
    unknown = [p for p in paths if p not in UPDATABLE_FIELDS]
    if unknown:
        problems.append(
            (
                "update_mask",
                f"unknown or read-only field(s) {', '.join(sorted(unknown))}; "
                f"updatable: {', '.join(UPDATABLE_FIELDS)}",
            )
        )
    if not paths:
        # AIP-134: an empty mask means every field the request sets.
        paths = [f for f in UPDATABLE_FIELDS if getattr(user, f)]
        if not paths:
            problems.append(("update_mask", "names no field to update"))
    changes: dict[str, object] = {}
    if "name" in paths:
        problems.append(("user.name", name_problem(user.name)))
        changes["name"] = user.name.strip()
    if "email" in paths:
        problems.append(("user.email", email_problem(user.email)))
        changes["email"] = user.email.strip()
    if "age" in paths:
        problems.append(("user.age", age_problem(user.age)))
        changes["age"] = user.age
    check(*problems)
    return changes


def _import_error(index: int, error: ServiceError) -> user_pb2.ImportUserError:
    field = ""
    if isinstance(error, InvalidArgument):
        field = ",".join(v.field for v in error.violations)
    elif "field" in error.metadata:
        field = error.metadata["field"]
    return user_pb2.ImportUserError(
        index=index, code=error.code.name, message=error.message, field=field
    )
