"""ImportUsers' rows as they arrive: validated one by one, within the import limits.

Nothing touches Postgres while the client is sending; the valid rows are stored together
once it has finished (UserStore.insert_new).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from parley.chassis import ServiceError
from parley.chassis.errors import LimitExceeded
from parley.proto import user_pb2

from .settings import ImportLimits
from .store import NewUser

__all__ = [
    "IMPORT_DURATION",
    "IMPORT_LIMITS",
    "IMPORT_ROWS",
    "MAX_IMPORT_ERRORS",
    "ReceivedRows",
    "RowErrors",
    "receive_rows",
]

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
    """What an import's client sent: the valid rows with their indexes, and the others' errors."""

    indexes: list[int] = field(default_factory=list)
    users: list[NewUser] = field(default_factory=list)
    invalid: RowErrors = field(default_factory=RowErrors)


async def receive_rows(
    requests: AsyncIterator[user_pb2.CreateUserRequest],
    limits: ImportLimits,
    validate: Callable[[user_pb2.CreateUserRequest], NewUser],
) -> ReceivedRows:
    """Reads every row until the client half-closes, validating each as it comes.

    LimitExceeded when a row beyond PARLEY_IMPORT_MAX_ROWS arrives, or when the client is
    still sending PARLEY_IMPORT_MAX_DURATION after the import began.
    """
    received = ReceivedRows()
    index = 0
    try:
        async with asyncio.timeout(limits.max_duration):
            async for request in requests:
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
    except TimeoutError:
        raise LimitExceeded(
            IMPORT_DURATION,
            "PARLEY_IMPORT_MAX_DURATION",
            limits.max_duration,
            f"an import's rows must all arrive within {limits.max_duration:g}s of its start; "
            "nothing was stored: send fewer rows per import, or send them faster",
        ) from None
    return received
