"""The `parley-chat` command: `serve` runs the ChatService."""

from __future__ import annotations

import argparse
import asyncio
import sys

from parley.chassis import ConfigError, configure_logging

from .server import create_server
from .settings import ChatSettings

__all__ = ["main"]


async def _serve() -> int:
    settings = ChatSettings.from_env()
    configure_logging(settings.server.log_format, settings.server.log_level)
    await create_server(settings).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley-chat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the ChatService gRPC server")
    parser.parse_args(argv)
    try:
        return asyncio.run(_serve())
    except ConfigError as error:
        print(f"parley-chat: configuration error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"parley-chat: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
