"""The `parley-user` command: `serve` runs the service, `migrate` updates the schema."""

from __future__ import annotations

import logging
import sys

from parley.chassis import Env, GrpcApp
from parley.chassis.cli import run_service_command
from parley.chassis.database import redact_url

from .migrations import MIGRATIONS
from .server import create_server
from .settings import UserSettings

__all__ = ["main"]

_log = logging.getLogger("parley.user")


def _build(env: Env) -> GrpcApp:
    settings = UserSettings.from_env(env)
    _log.info("database %s", redact_url(settings.database.url))
    return create_server(settings)


def main(argv: list[str] | None = None) -> int:
    return run_service_command("parley-user", __doc__ or "", _build, MIGRATIONS, argv)


if __name__ == "__main__":
    sys.exit(main())
