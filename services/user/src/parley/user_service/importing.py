"""ImportUsers' rows as they arrive: validated one by one, within the import limits.

Nothing touches Postgres while the client is sending; the valid rows are stored together
once it has finished (UserStore.insert_new). How an import ends, and so whether it may be
stored, is the rule written on UserService.ImportUsers in user.proto: a message that sets
`commit`, or the half-close of a client that did not declare `x-import-commit: explicit`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from parley.chassis import FieldViolation, InvalidArgument, ServiceError
from parley.chassis.errors import LimitExceeded
from parley.proto import user_pb2
from parley.proto.contract import EXPLICIT_IMPORT_COMMIT, IMPORT_COMMIT_KEY

from .settings import ImportLimits
from .store import NewUser

__all__ = [
    "EXPLICIT_COMMIT",
    "IMPORT_COMMIT_KEY",
    "IMPORT_DURATION",
    "IMPORT_LIMITS",
    "IMPORT_ROWS",
    "MAX_IMPORT_ERRORS",
    "ReceivedRows",
    "RowErrors",
    "commits_explicitly",
    "not_committed",
    "receive_rows",
]

# ImportUsers' request metadata (see the comment on UserService.ImportUsers in user.proto):
# `x-import-commit: explicit` declares that the client ends its import with `commit`.
EXPLICIT_COMMIT = EXPLICIT_IMPORT_COMMIT

# The `limit` label of each refusal, in parley_limit_refusals_total.
IMPORT_ROWS = "import_rows"
IMPORT_DURATION = "import_duration"
IMPORT_LIMITS = (IMPORT_ROWS, IMPORT_DURATION)
# How many per-row errors a response lists; every failed row is counted all the same.
MAX_IMPORT_ERRORS = 1000


@dataclass
class RowErrors:
    """The errors of failed rows in index order: all counted, the first MAX_IMPORT_ERRORS kept."""

    count: int = 0
    kept: list[tuple[int, ServiceError]] = field(default_factory=list)

    def add(self, index: int, error: ServiceError) -> None:
        """Adds the error of row `index`, which comes after every row added before."""
        self.count += 1
        if len(self.kept) < MAX_IMPORT_ERRORS:
            self.kept.append((index, error))

    def merged(self, other: RowErrors) -> RowErrors:
        """Both lists' errors in index order, still at most MAX_IMPORT_ERRORS kept."""
        both = heapq.merge(self.kept, other.kept, key=lambda item: item[0])
        return RowErrors(self.count + other.count, list(itertools.islice(both, MAX_IMPORT_ERRORS)))


@dataclass
class ReceivedRows:
    """What an import's client sent: the valid rows with their indexes, the others' errors,
    how many rows there were, and whether the last message set `commit`."""

    indexes: list[int] = field(default_factory=list)
    users: list[NewUser] = field(default_factory=list)
    invalid: RowErrors = field(default_factory=RowErrors)
    count: int = 0
    committed: bool = False


def commits_explicitly(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether the call declared `x-import-commit: explicit`; INVALID_ARGUMENT for any other
    value, or for the key given more than once."""
    values = [value for key, value in metadata or () if key == IMPORT_COMMIT_KEY]
    if not values:
        return False
    if values != [EXPLICIT_COMMIT]:
        raise InvalidArgument(
            [
                FieldViolation(
                    IMPORT_COMMIT_KEY,
                    f"must be {EXPLICIT_COMMIT!r}, given once, or left out (then the "
                    "half-close commits)",
                )
            ]
        )
    return True


def not_committed(received: ReceivedRows) -> InvalidArgument:
    """The refusal of an import that declared `x-import-commit: explicit` and ended without
    `commit`: its client half-closed too early, or its call was cut off."""
    return InvalidArgument(
        [
            FieldViolation(
                "commit",
                f"the request stream ended after {received.count} row(s) without a message "
                f"that sets commit, which {IMPORT_COMMIT_KEY}: {EXPLICIT_COMMIT} promised "
                "(or the call was cut off); nothing was stored: set commit on the last row, "
                "or send a last message with only commit set",
            )
        ],
        reason="IMPORT_NOT_COMMITTED",
    )


def _carries_no_row(request: user_pb2.CreateUserRequest) -> bool:
    """A message that sets only `commit` (proto3: every other field at its default)."""
    return not request.name and not request.email and request.age == 0


def _after_commit() -> InvalidArgument:
    return InvalidArgument(
        [
            FieldViolation(
                "commit",
                "a message arrived after the one that set commit, which must be the last; "
                "nothing was stored",
            )
        ],
        reason="MESSAGE_AFTER_COMMIT",
    )


async def receive_rows(
    requests: AsyncIterator[user_pb2.CreateUserRequest],
    limits: ImportLimits,
    validate: Callable[[user_pb2.CreateUserRequest], NewUser],
) -> ReceivedRows:
    """Reads every message until the request stream ends, validating each row as it comes.

    A message that sets `commit` must be the last; one that sets nothing else carries no row.
    The stream's end alone does not say whether the client finished: `received.committed`
    does, when the client sent `commit`. InvalidArgument for a message after `commit`;
    LimitExceeded when a row beyond PARLEY_IMPORT_MAX_ROWS arrives, or when the client is
    still sending PARLEY_IMPORT_MAX_DURATION after the import began.
    """
    received = ReceivedRows()
    index = 0
    try:
        async with asyncio.timeout(limits.max_duration):
            async for request in requests:
                if received.committed:
                    raise _after_commit()
                if request.commit and _carries_no_row(request):
                    received.committed = True
                    continue
                if index == limits.max_rows:
                    raise LimitExceeded(
                        IMPORT_ROWS,
                        "PARLEY_IMPORT_MAX_ROWS",
                        limits.max_rows,
                        f"an import may send at most {limits.max_rows:,} rows; nothing was "
                        "stored: split the rows over several imports",
                    )
                try:
                    user = validate(request)
                except ServiceError as error:
                    received.invalid.add(index, error)
                else:
                    received.indexes.append(index)
                    received.users.append(user)
                index += 1
                received.committed = request.commit
    except TimeoutError:
        raise LimitExceeded(
            IMPORT_DURATION,
            "PARLEY_IMPORT_MAX_DURATION",
            limits.max_duration,
            f"an import's rows must all arrive within {limits.max_duration:g}s of its start; "
            "nothing was stored: send fewer rows per import, or send them faster",
        ) from None
    received.count = index
    return received
