"""Access tokens: where a client gets its token, refreshing it before it expires, and minting
HS256 tokens for local development and tests.

A client sends `authorization: Bearer <token>` on every call. The token comes from, in order:
the `token` argument of the client (a string, or a `TokenProvider` callable asked on every
call), else the `PARLEY_TOKEN` environment variable. Wrap a provider that fetches tokens from
somewhere slow in `RefreshingToken`, which caches each token until shortly before its `exp`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jwt

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "DEFAULT_REFRESH_MARGIN",
    "SECRET_FILE",
    "TOKEN_ENV",
    "RefreshingToken",
    "TokenProvider",
    "find_secret",
    "mint_token",
    "parse_ttl",
    "resolve_token",
    "token_claims",
    "token_expiry",
]

TokenProvider = Callable[[], str]
"""A callable returning the token to send; a client calls it once per RPC."""

# The variable a client reads its token from when it is given none.
TOKEN_ENV = "PARLEY_TOKEN"

# RefreshingToken asks for a new token this many seconds before the cached one expires, so a
# call never leaves with a token that expires in flight (the servers allow 30 s of clock skew).
DEFAULT_REFRESH_MARGIN = 60.0

DEFAULT_ISSUER = "parley"
DEFAULT_AUDIENCE = "parley"

# Written by `parley-devstack run`, relative to the directory the stack runs in.
SECRET_FILE = Path(".parley") / "jwt-secret"

_TTL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_TTL_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def token_claims(
    subject: str,
    scopes: Iterable[str] = (),
    *,
    ttl: int = 3600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: int | None = None,
) -> dict[str, str | int]:
    """The claims of a Parley access token for `subject`: sub, iss, aud, iat, nbf, exp, and
    `scope` (space-separated) when there are scopes."""
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
    return claims


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
    claims = token_claims(subject, scopes, ttl=ttl, issuer=issuer, audience=audience, now=now)
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


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT as a Unix time, read without checking the signature.

    None when the token is not a JWT or has no numeric `exp`. Only the client's own cache uses
    this; the servers verify the signature.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


class RefreshingToken:
    """A `TokenProvider` that caches the token of another provider until it nearly expires.

    The wrapped `provider` is called for the first token and again whenever the cached token's
    `exp` is less than `margin` seconds away (or has passed). A token without a readable `exp`
    is not cached: the provider is asked on every call. Safe to share between threads and
    between sync and asyncio clients. The token itself never appears in `repr()`.

    `clock` returns the current Unix time; tests pass their own.
    """

    def __init__(
        self,
        provider: TokenProvider,
        *,
        margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if margin < 0:
            raise ValueError(f"margin must not be negative, got {margin}")
        self._provider = provider
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expiry: float | None = None

    def __call__(self) -> str:
        """The cached token, or a new one from the provider when it is about to expire."""
        with self._lock:
            if self._token is None or self._stale():
                token = self._provider()
                self._token = token
                self._expiry = token_expiry(token)
            return self._token

    @property
    def expires_at(self) -> float | None:
        """The cached token's `exp` (Unix time), or None before the first call or without one."""
        return self._expiry

    def invalidate(self) -> None:
        """Forget the cached token, so the next call asks the provider (after UNAUTHENTICATED)."""
        with self._lock:
            self._token = None
            self._expiry = None

    def _stale(self) -> bool:
        return self._expiry is None or self._expiry - self._clock() <= self._margin

    def __repr__(self) -> str:
        return f"RefreshingToken(provider={self._provider!r}, margin={self._margin:g})"


def resolve_token(
    token: str | TokenProvider | None, *, environ: Mapping[str, str] | None = None
) -> TokenProvider | None:
    """The provider a client uses: `token` itself, a constant for a string, else $PARLEY_TOKEN.

    None means no `authorization` header is sent (health checks need none; every other call
    then fails with Unauthenticated). The environment is read once, here.
    """
    if callable(token):
        return token
    value = token
    if value is None:
        value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    value = (value or "").strip()
    if value.lower().startswith("bearer "):
        value = value[len("bearer ") :].strip()
    if not value:
        return None
    return _StaticToken(value)


class _StaticToken:
    """A fixed token; a class rather than a lambda so that its repr hides the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "_StaticToken(***)"
