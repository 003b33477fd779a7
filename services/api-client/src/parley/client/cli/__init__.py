"""The `parley` command line, built on the Parley SDK (`parley.client`).

    parley users get|list|create|update|delete|import
    parley chat [send|tail|history|who]
    parley health
    parley token

`app` is the typer application (the `parley` entry point); `python -m parley.client.cli`
runs it too.
"""

from parley.client.cli.app import app

__all__ = ["app"]
