"""The `parley-user` command: `serve` runs the service, `migrate` updates the schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import psycopg

from parley.chassis import ConfigError, DatabaseSettings, Env, configure_logging
from parley.chassis.database import redact_url

from .migrations import apply_migrations, latest_version
from .server import create_server
from .settings import UserSettings

__all__ = ["main"]

_log = logging.getLogger("parley.user")


def _fail(message: str) -> int:
    print(f"parley-user: {message}", file=sys.stderr)
    return 2


async def _serve() -> int:
    settings = UserSettings.from_env()
    configure_logging(settings.server.log_format, settings.server.log_level)
    _log.info("database %s", redact_url(settings.database.url))
    app = create_server(settings)
    await app.run()
    return 0


async def _migrate() -> int:
    env = Env()
    database = DatabaseSettings.from_env(env)
    configure_logging(
        env.choice("PARLEY_LOG_FORMAT", "plain", ("plain", "json")),
        env.choice(
            "PARLEY_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), ignore_case=True
        ),
    )
    applied = await apply_migrations(database.url)
    _log.info(
        "schema is at version %d (%s)",
        latest_version(),
        f"applied {', '.join(map(str, applied))}" if applied else "already up to date",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley-user", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the UserService gRPC server")
    commands.add_parser("migrate", help="apply pending database migrations, then exit")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_serve() if args.command == "serve" else _migrate())
    except ConfigError as error:
        return _fail(f"configuration error: {error}")
    except OSError as error:
        return _fail(str(error))
    except psycopg.OperationalError as error:
        # Such as an unreachable database: one line, no traceback.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return _fail(f"postgres is unavailable: {lines[0]}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
