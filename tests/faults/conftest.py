"""Fault tests: real `parley-user serve` / `parley-chat serve` processes (started by the
launcher) on a private Postgres cluster and a private redis-server, so that the tests may stop,
kill and restart any of them; a restarted service keeps its ports.

`cluster` is Postgres + Redis + a migrated database; `fleet` starts the services on it. The
load itself comes from parley.testing.chat_load, people and checks from parley.testing.stack.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from parley.devstack.postgres import EmbeddedPostgres
from parley.testing import RedisServer, free_port, health_status, make_token, wait_until
from parley.testing.launcher import JWT_SECRET, Launcher, Served, chat_env, service_env
from parley.testing.metrics import scrape
from parley.testing.schemas import migrate_both

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Tokens live as long as a whole `make test` may run: ADMIN_TOKEN is made when this module is
# imported, and these tests run last, more than the default 10 minutes later on a busy machine.
TOKEN_TTL = 3 * 3600
ADMIN_TOKEN = make_token(JWT_SECRET, "faults-admin", "users:write", TOKEN_TTL)


@dataclass
class Cluster:
    postgres: EmbeddedPostgres  # on a fixed port: stop() and start() again on the same data
    redis: RedisServer
    database: str  # URL of the migrated database
    prefix: str  # Redis key prefix


@pytest.fixture
async def cluster(private_redis: Callable[..., Awaitable[RedisServer]]) -> AsyncIterator[Cluster]:
    """A private Postgres (with a migrated database) and a private Redis, both running."""
    # Not under tmp_path: pytest runs of other checkouts prune old basetemp directories.
    own = Path(tempfile.mkdtemp(prefix="parley-faults-"))
    postgres = EmbeddedPostgres(own / "data", free_port(), log_path=own / "pg.log", durable=False)
    try:
        start_postgres = asyncio.to_thread(postgres.start, timeout=60, databases=("parley_faults",))
        redis, _ = await asyncio.gather(private_redis(), start_postgres)
        database = postgres.dsn("parley_faults")
        await migrate_both(database)
        yield Cluster(postgres, redis, database, f"faults-{uuid.uuid4().hex[:10]}")
    finally:
        await asyncio.to_thread(postgres.stop)  # fast shutdown; Redis stops after the test
        shutil.rmtree(own, ignore_errors=True)


class Fleet:
    """Service processes of one test on the cluster, through the test's launcher (which
    restarts, terminates and kills them)."""

    def __init__(self, cluster: Cluster, launcher: Launcher) -> None:
        self.cluster = cluster
        self.launcher = launcher
        self.procs: list[Served] = []

    def env(self, kind: str, **overrides: str) -> dict[str, str]:
        overrides = {"PARLEY_DB_POOL_TIMEOUT": "1", "PARLEY_SHUTDOWN_GRACE": "5", **overrides}
        if kind == "user":
            return service_env(self.cluster.database, **overrides)
        redis, prefix = self.cluster.redis.url, self.cluster.prefix
        return chat_env(self.cluster.database, redis, prefix, "", **overrides)

    async def add(self, kind: str, **overrides: str) -> Served:
        """`parley-<kind> serve` (chat: give PARLEY_USER_SERVICE_ADDR), once SERVING."""
        proc = await self.launcher.process(kind, self.env(kind, **overrides))
        self.procs.append(proc)
        return proc

    async def health(self, proc: Served, name: str | None = None) -> int | None:
        """The readiness it reports for `name` (default: its own service); None if unreachable."""
        try:
            return await health_status(proc.port, name or proc.health_name)
        except grpc.aio.AioRpcError:
            return None

    async def wait_health(
        self, proc: Served, status: int, timeout: float, name: str | None = None
    ) -> float:
        """Waits until `proc` reports `status` for `name`; returns the seconds it took."""
        started = time.monotonic()

        async def reached() -> bool:
            return await self.health(proc, name) == status

        label = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        await wait_until(reached, timeout, f"{name or proc.health_name} on {proc.port}: {label}")
        return time.monotonic() - started

    async def handled(self, proc: Served, methods: Sequence[str]) -> float:
        """How many calls of `methods` its current process completed (grpc_server_handled)."""
        samples = (await scrape(proc.metrics_port)).samples("grpc_server_handled_total")
        return sum(s.value for s in samples if s.labels.get("grpc_method") in methods)


@pytest.fixture
def fleet(cluster: Cluster, launcher: Launcher) -> Fleet:
    return Fleet(cluster, launcher)


def ipv4_target(procs: Sequence[Served]) -> str:
    """One gRPC target over several replicas (round_robin spreads calls over them)."""
    return "ipv4:" + ",".join(p.target for p in procs)
