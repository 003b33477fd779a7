"""Minting HS256 access tokens for local development and tests, and finding the secret."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import jwt

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "SECRET_FILE",
    "find_secret",
    "mint_token",
    "parse_ttl",
]

DEFAULT_ISSUER = "parley"
DEFAULT_AUDIENCE = "parley"

# Written by `parley-devstack run`, relative to the directory the stack runs in.
SECRET_FILE = Path(".parley") / "jwt-secret"

_TTL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_TTL_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def mint_token(
    secret: str,
    subject: str,
    scopes: Iterable[str] = (),
    *,
    ttl: int = 3600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: int | None = None,
) -> str:
    """An HS256 JWT for `subject`, valid from now for `ttl` seconds, granting `scopes`."""
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    issued_at = int(time.time()) if now is None else now
    claims: dict[str, str | int] = {
        "sub": subject,
        "iss": issuer,
        "aud": audience,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
    }
    scope = " ".join(dict.fromkeys(s for s in scopes if s))
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")


def parse_ttl(text: str) -> int:
    """Seconds in a duration such as `30s`, `15m`, `1h` or `24h`; a bare number is seconds."""
    value = text.strip()
    if value.isdigit():
        seconds = int(value)
    else:
        match = _TTL.match(value)
        if match is None:
            raise ValueError(f"expected a duration such as 30s, 15m, 1h or 24h, got {text!r}")
        seconds = int(match.group(1)) * _TTL_UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {text!r}")
    return seconds


def find_secret(
    explicit: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    start: Path | None = None,
) -> str | None:
    """The signing secret: `explicit`, else $PARLEY_JWT_SECRET, else the nearest secret file.

    The file is looked up as `.parley/jwt-secret` in `start` (the current directory by default)
    and then in each of its parents.
    """
    if explicit:
        return explicit
    env = os.environ if environ is None else environ
    from_env = env.get("PARLEY_JWT_SECRET", "").strip()
    if from_env:
        return from_env
    directory = (Path.cwd() if start is None else start).resolve()
    for candidate in (directory, *directory.parents):
        path = candidate / SECRET_FILE
        try:
            secret = path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if secret:
            return secret
    return None
