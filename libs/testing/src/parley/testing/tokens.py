"""The one place tests make tokens: the claims of a real Parley token (the SDK's
`token_claims`, as `parley token` mints them), with whatever a test changes about them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from parley.client.tokens import token_claims

__all__ = ["bearer", "make_token"]


def make_token(
    secret: Any,
    sub: str,
    scope: str = "",
    ttl: float = 600,
    *,
    algorithm: str = "HS256",
    headers: Mapping[str, Any] | None = None,
    omit: Sequence[str] = (),
    **claims: Any,
) -> str:
    """A JWT for `sub` with the space-separated `scope`, signed with `secret` (a key for
    other algorithms), expiring `ttl` seconds from now (negative: already expired).

    `claims` are added or override the standard ones; `omit` drops claims; `headers` go in the
    JWT header. Anything but the defaults makes a token the servers are meant to refuse, or
    accept only under settings of the test's own.
    """
    payload: dict[str, Any] = token_claims(sub, scope.split(), ttl=0)
    payload["exp"] = payload["iat"] + int(ttl)
    payload.update(claims)
    for name in omit:
        payload.pop(name, None)
    return jwt.encode(payload, secret, algorithm=algorithm, headers=dict(headers or {}))


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return [("authorization", f"Bearer {token}")]
