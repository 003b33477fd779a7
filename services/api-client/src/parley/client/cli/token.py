"""`parley token`: mint an access token for local development and tests."""

from __future__ import annotations

from typing import Annotated

import typer

from parley.client.cli.context import examples
from parley.client.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    SECRET_FILE,
    find_secret,
    mint_token,
    parse_ttl,
)

__all__ = ["token"]

TOKEN_EXAMPLES = examples(
    "export PARLEY_TOKEN=$(parley token --sub 1 --scope users:write)",
    "parley token --sub 2 --ttl 15m",
    note=(
        "Chat needs a token whose --sub is the id of an existing user; user writes need the "
        "users:write scope."
    ),
)


def _ttl(value: str) -> int:
    try:
        return parse_ttl(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def token(
    sub: Annotated[str, typer.Option("--sub", help="Subject: the user id the token speaks for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="A scope to grant, e.g. users:write; repeat for more."),
    ] = None,
    ttl: Annotated[
        str, typer.Option("--ttl", help="Lifetime, e.g. 30s, 15m, 1h or 24h.", show_default=True)
    ] = "1h",
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            help=(
                "HS256 signing secret. Defaults to $PARLEY_JWT_SECRET, then to the "
                f"{SECRET_FILE} file of the local dev stack in this or a parent directory."
            ),
            show_default=False,
        ),
    ] = None,
    issuer: Annotated[
        str, typer.Option("--issuer", envvar="PARLEY_JWT_ISSUER", help="iss claim.")
    ] = DEFAULT_ISSUER,
    audience: Annotated[
        str, typer.Option("--audience", envvar="PARLEY_JWT_AUDIENCE", help="aud claim.")
    ] = DEFAULT_AUDIENCE,
) -> None:
    """Print a signed HS256 access token (JWT) for local development and tests."""
    seconds = _ttl(ttl)
    key = find_secret(secret)
    if key is None:
        typer.echo(
            "parley token: no signing secret; pass --secret, set PARLEY_JWT_SECRET, "
            f"or start the dev stack (make run) so that {SECRET_FILE} exists",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(
        mint_token(
            key,
            sub,
            scope or (),
            ttl=seconds,
            issuer=issuer,
            audience=audience,
        )
    )
