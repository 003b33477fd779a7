"""The `parley-chat` command: `serve` runs the ChatService, `migrate` updates its schema."""

from __future__ import annotations

import sys

from parley.chassis import Env, GrpcApp
from parley.chassis.cli import run_service_command

from .migrations import MIGRATIONS
from .server import create_server
from .settings import ChatSettings

__all__ = ["main"]


def _build(env: Env) -> GrpcApp:
    return create_server(ChatSettings.from_env(env))


def main(argv: list[str] | None = None) -> int:
    return run_service_command("parley-chat", __doc__ or "", _build, MIGRATIONS, argv)


if __name__ == "__main__":
    sys.exit(main())
