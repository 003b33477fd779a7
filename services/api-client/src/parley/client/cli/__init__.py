"""The `parley` command line, built on the Parley SDK (`parley.client`).

    parley users get|list|create|update|delete|import
    parley chat [send|tail|history|who]
    parley rooms create|list|get|update|delete|members|add|remove|leave|dm
    parley dm USER_ID
    parley health
    parley token

It needs the SDK's `cli` extra (typer, rich, prompt-toolkit): `pip install
'parley-client[cli]'`. `main` is the `parley` entry point: without the extra it prints how to
install it, in one line. `app` is the typer application; `python -m parley.client.cli` runs
`main` too. This module imports neither until `app` is used, so that `main` can tell.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parley.client.cli.root import app

__all__ = ["app", "main"]

# The modules of the `cli` extra, by the name of the distribution that provides each.
_EXTRA = {"typer": "typer", "rich": "rich", "prompt_toolkit": "prompt-toolkit"}
# No import of parley.client.cli.errors here for EXIT_FAILED: it needs rich.
_EXIT_FAILED = 1


def _missing_extra() -> list[str]:
    """The distributions of the `cli` extra that are not installed, by name."""
    return [dist for module, dist in _EXTRA.items() if importlib.util.find_spec(module) is None]


def main() -> None:
    """Run the `parley` command, or say how to install the `cli` extra when it is missing."""
    missing = _missing_extra()
    if missing:
        print(
            f"parley: error: the parley command needs the cli extra of parley-client "
            f"(missing: {', '.join(missing)}); install it with: pip install 'parley-client[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(_EXIT_FAILED)
    from parley.client.cli.root import app

    app(prog_name="parley")


def __getattr__(name: str) -> object:
    # `app` on first use only: importing it imports typer and rich.
    if name == "app":
        from parley.client.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
