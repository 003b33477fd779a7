"""The command line every service shares: `serve`, and `migrate` where it has a schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

import psycopg

from parley.chassis.config import ConfigError, DatabaseSettings, Env, log_settings
from parley.chassis.database import redact_url
from parley.chassis.logs import configure_logging
from parley.chassis.migrations import MigrationSet
from parley.chassis.server import GrpcApp
from parley.chassis.tracing import TracingSettings, start_tracing, stop_tracing

__all__ = ["run_service_command"]

_log = logging.getLogger("parley.cli")


async def _serve(prog: str, build: Callable[[Env], GrpcApp]) -> int:
    env = Env()
    configure_logging(*log_settings(env))
    # Before the service is built: its pools' connections are instrumented as they are made.
    tracing = TracingSettings.from_env(env)
    start_tracing(tracing, service_name=prog)
    try:
        app = build(env)
        # Once every setting has been read: a bad one is the only line on stderr.
        _log.info("%s", tracing.describe())
        await app.run()
    finally:
        # The spans of the last calls, for at most 2 s whatever the collector does.
        await asyncio.to_thread(stop_tracing)
    return 0


async def _migrate(migrations: MigrationSet) -> int:
    env = Env()
    database = DatabaseSettings.from_env(env)
    # How long to retry a database that is not up yet (a container or pod started with it).
    wait = env.seconds("PARLEY_MIGRATE_WAIT", 60.0, minimum=0.0, maximum=3600.0)
    configure_logging(*log_settings(env))
    applied = await migrations.apply(database.url, wait=wait)
    _log.info(
        "%s schema of %s is at version %d (%s)",
        migrations.component,
        redact_url(database.url),
        migrations.latest_version(),
        f"applied {', '.join(map(str, applied))}" if applied else "already up to date",
    )
    return 0


def run_service_command(
    prog: str,
    description: str,
    build: Callable[[Env], GrpcApp],
    migrations: MigrationSet | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parses argv and runs the command; every failure is one line on stderr, no traceback."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server until SIGTERM or SIGINT")
    if migrations is not None:
        commands.add_parser("migrate", help="apply pending database migrations, then exit")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{prog}: {message}", file=sys.stderr)
        return 2

    try:
        if args.command == "migrate":
            assert migrations is not None
            return asyncio.run(_migrate(migrations))
        return asyncio.run(_serve(prog, build))
    except ConfigError as error:
        return fail(f"configuration error: {error}")
    except OSError as error:
        return fail(str(error))
    except psycopg.OperationalError as error:
        # Such as an unreachable database: one line, no traceback.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return fail(f"postgres is unavailable: {lines[0]}")
    except KeyboardInterrupt:
        return 130
