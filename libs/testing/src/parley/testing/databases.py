"""One private Postgres database per test, created ahead of time on worker threads."""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg

__all__ = ["ADMIN_URL", "DatabaseFactory", "database_url"]

# A database the tests may create and drop databases from.
ADMIN_URL = os.environ.get(
    "PARLEY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    """The URL of database `name` on the server of `admin_url`."""
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["dbname"] = name
    return psycopg.conninfo.make_conninfo("", **params)


class DatabaseFactory:
    """Hands out new databases, each prepared (e.g. migrated) by `prepare(url)`.

    CREATE DATABASE costs a few hundred milliseconds of fsync; preparing the next ones on
    worker threads while the current test runs keeps one private database per test
    affordable. A database lives until it is `release`d, and is dropped at the next `take`
    after that (by which time the servers of the test that used it have stopped), or when the
    factory closes.
    """

    def __init__(
        self,
        prefix: str,
        prepare: Callable[[str], None] | None = None,
        *,
        ahead: int = 2,
        admin_url: str = ADMIN_URL,
    ) -> None:
        self._prefix = prefix
        self._prepare = prepare
        self._ahead = ahead
        self._admin_url = admin_url
        self._executor = ThreadPoolExecutor(max_workers=3, thread_name_prefix="test-database")
        self._ready: deque[Future[str]] = deque()
        self._used: list[str] = []
        self._released: list[str] = []
        self._drops: list[Future[None]] = []

    def take(self, *, prepared: bool = True) -> str:
        """The URL of a new database; with `prepared` false it is empty."""
        self._drops += [self._executor.submit(self._drop, name) for name in self._released]
        self._released.clear()
        if prepared:
            while len(self._ready) <= self._ahead:
                self._ready.append(self._executor.submit(self._create, True))
            name = self._ready.popleft().result()
        else:
            name = self._executor.submit(self._create, False).result()
        self._used.append(name)
        return database_url(name, self._admin_url)

    def release(self, url: str) -> None:
        """Done with the database at `url`: it is dropped at the next `take` or `close`."""
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        if name in self._used:
            self._used.remove(name)
            self._released.append(name)

    def close(self) -> None:
        """Drops every database handed out or prepared."""
        names = self._used + self._released + [future.result() for future in self._ready]
        self._drops += [self._executor.submit(self._drop, name) for name in names]
        for drop in self._drops:
            drop.result()
        self._executor.shutdown()

    def _create(self, prepared: bool) -> str:
        name = f"{self._prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if prepared and self._prepare is not None:
            self._prepare(database_url(name, self._admin_url))
        return name

    def _drop(self, name: str) -> None:
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
