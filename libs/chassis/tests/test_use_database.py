"""GrpcApp.use_database on a real Postgres: readiness `postgres` follows the schema, the
pool is open before the server starts, and it is closed only after every on_stop hook (which
may still read)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from parley.chassis import Database, DatabaseSettings, Env, GrpcApp
from parley.testing import DatabaseFactory
from parley.testing.schemas import migrate_both_sync
from parley.user_service.migrations import MIGRATIONS

SERVICE = "user.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def databases() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory("parley_chassis_db", migrate_both_sync, ahead=0)
    try:
        yield factory
    finally:
        factory.close()


def _settings(url: str) -> DatabaseSettings:
    return DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url}))


@pytest.mark.parametrize("migrated", [True, False])
async def test_use_database_wires_the_pool_and_readiness(serve, databases, migrated) -> None:
    url = databases.take(prepared=migrated)
    pools: list[Database] = []
    read_while_stopping: list[int] = []

    def wire(app: GrpcApp) -> None:
        db = app.use_database(
            _settings(url), application_name="chassis-test", migrations=MIGRATIONS
        )

        async def read() -> None:
            async with db.connection() as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
                assert row is not None
                read_while_stopping.append(row[0])

        app.on_stop(read)
        pools.append(db)

    running = await serve(before_start=wire)
    expected = SERVING if migrated else NOT_SERVING
    # The monitor checks once before the server starts: readiness is known from the first call.
    assert await running.health_status(SERVICE) == expected
    assert not pools[0].pool.closed

    await running.stop()
    assert read_while_stopping == [1]  # the hook still had its pool
    assert pools[0].pool.closed
