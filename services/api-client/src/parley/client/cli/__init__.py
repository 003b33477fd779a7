"""The `parley` command line, built on the Parley SDK (`parley.client`).

    parley users get|list|create|update|delete|import
    parley chat [send|tail|history|who]
    parley rooms create|list|get|update|delete|members|add|remove|leave|dm
    parley dm USER_ID
    parley health
    parley token

`app` is the typer application (the `parley` entry point); `python -m parley.client.cli`
runs it too.
"""

from parley.client.cli.app import app

__all__ = ["app"]
