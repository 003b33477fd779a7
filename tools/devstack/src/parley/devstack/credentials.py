"""The stack's secrets (the JWT signing secret, the embedded Redis's password). The tokens it
hands to commands run against the stack are the SDK's (`mint_token`, as `parley token` makes
them)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from parley.client.tokens import mint_token

__all__ = [
    "REDIS_PASSWORD_FILE_NAME",
    "SECRET_FILE_NAME",
    "load_or_create_secret",
    "mint_token",
]

# `parley token` looks for this file under `.parley/` in the current directory and its parents.
SECRET_FILE_NAME = "jwt-secret"
# The embedded Redis's password, next to the JWT secret.
REDIS_PASSWORD_FILE_NAME = "redis-password"


def load_or_create_secret(path: Path) -> str:
    """The secret stored in `path`; on first use, a new random one written with mode 0600."""
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    secret = secrets.token_urlsafe(48)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    path.chmod(0o600)
    return secret
