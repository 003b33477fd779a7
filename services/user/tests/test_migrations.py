"""Migrations: idempotent, safe to run concurrently, and a clear one-line CLI failure."""

from __future__ import annotations

import asyncio
import os
import sys

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from parley.user_service.migrations import (
    COMPONENT,
    apply_migrations,
    latest_version,
    load_migrations,
)

LEDGER = "SELECT component, version, name FROM parley_schema_migrations ORDER BY version"


async def ledger(url: str) -> list[tuple[str, int, str]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(LEDGER)
        return await cur.fetchall()


async def users_table_exists(url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT to_regclass('users') IS NOT NULL")
        (exists,) = await cur.fetchone()
        return bool(exists)


def expected_ledger() -> list[tuple[str, int, str]]:
    return [(COMPONENT, m.version, m.name) for m in load_migrations()]


def test_migrations_are_numbered_from_one_without_gaps():
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert latest_version() == len(versions) >= 1


async def test_applying_twice_applies_nothing_the_second_time(empty_database):
    assert not await users_table_exists(empty_database)

    first = await apply_migrations(empty_database)
    second = await apply_migrations(empty_database)

    assert first == list(range(1, latest_version() + 1))
    assert second == []
    assert await users_table_exists(empty_database)
    assert await ledger(empty_database) == expected_ledger()


async def test_concurrent_runs_apply_each_migration_once(empty_database):
    results = await asyncio.gather(*(apply_migrations(empty_database) for _ in range(3)))

    applied = sorted(results, key=len)
    assert applied[:-1] == [[], []]
    assert applied[-1] == list(range(1, latest_version() + 1))
    assert await ledger(empty_database) == expected_ledger()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parley.user_service.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_two_migrate_commands_at_once_both_succeed(empty_database):
    env = {"PARLEY_DATABASE_URL": empty_database}

    results = await asyncio.gather(run_cli("migrate", env=env), run_cli("migrate", env=env))

    for code, _, stderr in results:
        assert code == 0, stderr
        assert "Traceback" not in stderr
    outputs = sorted(stderr for _, _, stderr in results)
    assert sum("already up to date" in s for s in outputs) == 1, outputs
    assert (
        sum(f"applied {', '.join(map(str, range(1, latest_version() + 1)))}" in s for s in outputs)
        == 1
    ), outputs
    assert await ledger(empty_database) == expected_ledger()


async def test_migrate_with_an_unreachable_database_fails_with_one_line(unused_port):
    env = {
        "PARLEY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{unused_port}/parley",
        "PARLEY_MIGRATE_WAIT": "0s",
    }

    code, stdout, stderr = await run_cli("migrate", env=env)

    assert code != 0
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("parley-user: ")
    assert "postgres" in lines[0]
    assert str(unused_port) in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PARLEY_DATABASE_URL": ""}, "PARLEY_DATABASE_URL"),
        ({"PARLEY_DATABASE_URL": "mysql://nope"}, "PARLEY_DATABASE_URL"),
        (
            {"PARLEY_DATABASE_URL": "postgresql://127.0.0.1/x", "PARLEY_MIGRATE_WAIT": "soon"},
            "PARLEY_MIGRATE_WAIT",
        ),
        ({"PARLEY_DATABASE_URL": "postgresql://u:s3cret@h:port/x"}, "PARLEY_DATABASE_URL"),
    ],
)
async def test_migrate_with_a_bad_configuration_fails_with_one_line(env, needle):
    code, _, stderr = await run_cli("migrate", env=env)

    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert needle in lines[0]
    assert "s3cret" not in stderr


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_migrate_waits_for_a_database_that_comes_up_later(empty_database, unused_port):
    """Nothing listens on the port until migrate has logged a failed attempt; then a TCP relay
    to the real Postgres opens there, as a database container finishing its start would."""
    target = conninfo_to_dict(empty_database)
    late = make_conninfo(empty_database, host="127.0.0.1", port=unused_port)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parley.user_service.cli",
        "migrate",
        env={**os.environ, "PARLEY_DATABASE_URL": late, "PARLEY_MIGRATE_WAIT": "60s"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None

    async def relay(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        server_reader, server = await asyncio.open_connection(target["host"], target["port"])
        await asyncio.gather(_forward(client_reader, server), _forward(server_reader, client))

    async with asyncio.timeout(60):
        first_retry = (await process.stderr.readline()).decode()
        if "is not reachable yet (attempt 1" not in first_retry:
            _, rest = await process.communicate()
            pytest.fail(f"migrate did not retry: {first_retry}{rest.decode()}")
        listener = await asyncio.start_server(relay, "127.0.0.1", unused_port)
        try:
            _, rest = await process.communicate()
        finally:
            listener.close()

    assert process.returncode == 0, first_retry + rest.decode()
    assert "Connection refused" in first_retry
    assert await ledger(empty_database) == expected_ledger()


async def test_migrate_gives_up_after_its_wait_with_one_line_per_attempt(unused_port):
    env = {
        "PARLEY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{unused_port}/parley",
        "PARLEY_MIGRATE_WAIT": "2s",
    }

    code, stdout, stderr = await run_cli("migrate", env=env)

    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    retries = [line for line in lines if "is not reachable yet (attempt" in line]
    assert len(retries) >= 2, stderr
    assert all(str(unused_port) in line and "Connection refused" in line for line in retries)
    assert "Traceback" not in stderr
    assert lines[-1].startswith("parley-user: postgres is unavailable: ")
    assert f"gave up after {len(retries) + 1} attempts in 2s" in lines[-1]
    assert len(lines) == len(retries) + 1, stderr


async def test_migrate_does_not_wait_on_a_database_that_does_not_exist(empty_database):
    missing = make_conninfo(empty_database, dbname="parley_no_such_database")
    env = {"PARLEY_DATABASE_URL": missing, "PARLEY_MIGRATE_WAIT": "60s"}

    code, _, stderr = await asyncio.wait_for(run_cli("migrate", env=env), timeout=20)

    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert 'database "parley_no_such_database" does not exist' in lines[0]
