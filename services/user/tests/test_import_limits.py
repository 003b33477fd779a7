"""The import limits: PARLEY_IMPORT_MAX_ROWS and PARLEY_IMPORT_MAX_DURATION, read at start-up,
each refusal RESOURCE_EXHAUSTED naming its setting and counted in parley_limit_refusals_total."""

from __future__ import annotations

import asyncio
import secrets

import grpc
import pytest

from parley.chassis import ConfigError, Env
from parley.proto import user_pb2, user_pb2_grpc
from parley.user_service import UserSettings

BASE_ENV = {
    "PARLEY_DATABASE_URL": "postgresql://localhost/x",
    "PARLEY_JWT_SECRET": secrets.token_urlsafe(48),
}


def refusals(server, limit: str) -> float | None:
    return server.metrics.registry.get_sample_value("parley_limit_refusals_total", {"limit": limit})


def test_the_limits_default_to_10000_rows_and_60_seconds():
    imports = UserSettings.from_env(Env(BASE_ENV)).imports
    assert (imports.max_rows, imports.max_duration) == (10_000, 60.0)

    env = {**BASE_ENV, "PARLEY_IMPORT_MAX_ROWS": "250", "PARLEY_IMPORT_MAX_DURATION": "2m"}
    imports = UserSettings.from_env(Env(env)).imports
    assert (imports.max_rows, imports.max_duration) == (250, 120.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PARLEY_IMPORT_MAX_ROWS", "0"),
        ("PARLEY_IMPORT_MAX_ROWS", "ten"),
        ("PARLEY_IMPORT_MAX_ROWS", "100001"),
        ("PARLEY_IMPORT_MAX_DURATION", "50ms"),
        ("PARLEY_IMPORT_MAX_DURATION", "2h"),
        ("PARLEY_IMPORT_MAX_DURATION", "soon"),
    ],
)
def test_a_bad_limit_stops_start_up_naming_the_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        UserSettings.from_env(Env({**BASE_ENV, variable: value}))
    assert info.value.variable == variable
    assert "\n" not in str(info.value)


def row(email: str, age: int = 30) -> user_pb2.CreateUserRequest:
    return user_pb2.CreateUserRequest(name="Row", email=email, age=age)


async def stored_count(pg) -> int:
    cur = await pg.execute("SELECT count(*) FROM users")
    (count,) = await cur.fetchone()
    return count


async def test_invalid_rows_count_towards_the_row_limit(start_server, database, auth, pg, details):
    server = await start_server(database, PARLEY_IMPORT_MAX_ROWS="3")
    assert refusals(server, "import_rows") == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        rows = [row("a@example.com"), row("bad", age=-1), row("b@example.com")]
        response = await stub.ImportUsers(iter(rows), metadata=auth)
        assert (response.created_count, response.failed_count) == (2, 1)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportUsers(
                iter([*rows[1:], row("c@example.com"), row("bad")]), metadata=auth
            )

    found = details(info.value)
    assert found.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert found.message == (
        "an import may send at most 3 rows; nothing was stored: split the rows over several "
        "imports (limit PARLEY_IMPORT_MAX_ROWS=3)"
    )
    assert found.reason == "LIMIT_EXCEEDED"
    assert found.metadata == {
        "limit": "import_rows",
        "setting": "PARLEY_IMPORT_MAX_ROWS",
        "value": "3",
    }
    assert await stored_count(pg) == 2
    assert refusals(server, "import_rows") == 1
    assert refusals(server, "import_duration") == 0


async def test_a_client_still_sending_at_the_time_limit_is_refused(
    start_server, database, auth, pg, details, pool, wait_for
):
    server = await start_server(database, PARLEY_IMPORT_MAX_DURATION="0.5s")
    assert refusals(server, "import_duration") == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        call = stub.ImportUsers(metadata=auth, timeout=30)
        await call.write(row("slow@example.com"))
        # The client never finishes; the server ends the call at its limit.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call, 20)

    found = details(info.value)
    assert found.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert found.message.endswith("(limit PARLEY_IMPORT_MAX_DURATION=0.5)")
    assert "within 0.5s of its start" in found.message
    assert found.metadata["limit"] == "import_duration"
    assert await stored_count(pg) == 0
    assert refusals(server, "import_duration") == 1
    stats = pool(server)
    assert stats["waiting"] == 0
