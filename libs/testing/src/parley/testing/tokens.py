"""Tokens the test servers accept."""

from __future__ import annotations

import time
from typing import Any

import jwt

__all__ = ["bearer", "make_token"]


def make_token(secret: str, sub: str, scope: str = "", ttl: float = 600, **claims: Any) -> str:
    """An HS256 JWT for `sub` with Parley's default issuer and audience."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": sub,
        "iss": "parley",
        "aud": "parley",
        "iat": now,
        "exp": now + ttl,
    }
    if scope:
        payload["scope"] = scope
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return [("authorization", f"Bearer {token}")]
