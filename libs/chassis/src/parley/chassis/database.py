"""Postgres through a psycopg 3 async pool: creation, health probe, metrics and error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from parley.chassis.config import DatabaseSettings
from parley.chassis.errors import DeadlineExceeded, Unavailable
from parley.chassis.tasks import cancel_and_wait, detached_task

__all__ = ["Database", "redact_url"]

DEPENDENCY = "postgres"

_log = logging.getLogger("parley.database")

# While Postgres is known to be unreachable, a call waits this long for a pooled connection
# (one may have come back) before it fails, instead of the whole pool timeout.
FAIL_FAST_WAIT = 0.25

# How long the pool keeps retrying one lost connection before it gives up and lets the next
# request start afresh. psycopg_pool doubles the delay between attempts without a cap, so
# after a long outage the next attempt could be minutes away; a short give-up keeps the
# delay after Postgres returns to a few seconds at most.
RECONNECT_TIMEOUT = 10.0

# A connection handed back to the pool less than this long ago is lent out again without the
# pool's check (an extra round trip, ~10% of a GetUser's server time); an older one is checked.
CHECK_IDLE_AFTER = 1.0


def redact_url(url: str) -> str:
    """The connection string with any password removed, safe to log."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database url>"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **params)


class Database:
    """A service's connection pool; opens in the background so the service starts without it.

    When a call cannot get a connection, a direct connection attempt outside the pool tells
    whether Postgres is reachable at all. While it is not, calls fail with UNAVAILABLE after
    a short wait instead of each waiting the whole pool timeout; the first connection the
    pool hands out again, or a direct attempt that works, ends that state.
    """

    def __init__(self, settings: DatabaseSettings, *, application_name: str) -> None:
        self.settings = settings
        self._application_name = application_name
        self._unreachable: str | None = None
        self._reachability_check: asyncio.Task[None] | None = None
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            settings.url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.pool_timeout,
            open=False,
            name=application_name,
            check=self._check_if_idle,
            reset=self._note_return,
            reconnect_timeout=RECONNECT_TIMEOUT,
            kwargs={
                "autocommit": True,
                "connect_timeout": 5,
                "application_name": application_name,
            },
        )

    async def _note_return(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def _check_if_idle(self, conn: psycopg.AsyncConnection[Any]) -> None:
        returned = self._returned.get(conn)
        if returned is None or time.monotonic() - returned > CHECK_IDLE_AFTER:
            await AsyncConnectionPool.check_connection(conn)

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        if self._reachability_check is not None:
            await cancel_and_wait(self._reachability_check)
        await self.pool.close()

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """A pooled connection; failures become UNAVAILABLE or DEADLINE_EXCEEDED errors."""
        wait = (
            self.settings.pool_timeout
            if timeout is None
            else min(timeout, self.settings.pool_timeout)
        )
        if self._unreachable is not None:
            wait = min(wait, FAIL_FAST_WAIT)
        asked = time.monotonic()
        acquired = False
        try:
            async with self.pool.connection(timeout=max(wait, 0.001)) as conn:
                acquired = True
                self._unreachable = None
                yield conn
        except asyncio.CancelledError:
            # A caller (a deadline, a health probe's timeout) gave up waiting for a connection.
            if not acquired and time.monotonic() - asked > FAIL_FAST_WAIT:
                self._check_reachability()
            raise
        except PoolTimeout:
            if self._unreachable is not None:
                raise Unavailable(DEPENDENCY, self._unreachable) from None
            self._check_reachability()
            raise Unavailable(
                DEPENDENCY, f"no database connection could be had within {wait:.1f}s"
            ) from None
        except pg_errors.UndefinedTable:
            raise Unavailable(
                DEPENDENCY, "the database schema is missing; run the service's migrate command"
            ) from None
        except pg_errors.QueryCanceled:
            raise DeadlineExceeded(
                "the database query was cancelled at the call's deadline"
            ) from None
        except psycopg.OperationalError as exc:
            self._check_reachability()
            raise Unavailable(DEPENDENCY, _first_line(exc)) from None

    async def probe(self) -> None:
        """Raises unless a connection can run a trivial query."""
        async with self.connection() as conn:
            await conn.execute("SELECT 1")

    def _check_reachability(self) -> None:
        """Starts a direct connection attempt in the background, unless one is under way."""
        if self._reachability_check is None or self._reachability_check.done():
            self._reachability_check = detached_task(
                self._connect_directly(), name="postgres-reachability"
            )

    async def _connect_directly(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.settings.url,
                autocommit=True,
                connect_timeout=5,
                application_name=self._application_name,
            )
        except psycopg.Error as exc:
            if self._unreachable is None:
                _log.warning("postgres is unreachable; calls fail fast until it is back")
            self._unreachable = _first_line(exc)
            return
        async with conn:
            await conn.execute("SELECT 1")
        if self._unreachable is not None:
            _log.info("postgres is reachable again")
        self._unreachable = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_PoolCollector(self.pool))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class _PoolCollector(Collector):
    """Reads the pool's statistics at scrape time."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = self._pool.get_stats()
        gauges = {
            "pool_size": ("parley_db_pool_connections", "Connections held by the pool."),
            "pool_available": ("parley_db_pool_idle_connections", "Idle connections in the pool."),
            "pool_max": ("parley_db_pool_max_connections", "Most connections the pool may hold."),
            "requests_waiting": (
                "parley_db_pool_waiting_requests",
                "Requests waiting for a connection.",
            ),
        }
        counters = {
            "requests_num": ("parley_db_pool_requests", "Connections requested from the pool."),
            "requests_errors": (
                "parley_db_pool_request_errors",
                "Requests that got no connection.",
            ),
            "connections_errors": (
                "parley_db_pool_connection_errors",
                "Failed connection attempts.",
            ),
            "connections_lost": ("parley_db_pool_connections_lost", "Connections found broken."),
        }
        for key, (name, doc) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        for key, (name, doc) in counters.items():
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
