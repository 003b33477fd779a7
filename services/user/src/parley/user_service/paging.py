"""ListUsers paging (AIP-158): page size rules and opaque keyset page tokens."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from parley.chassis import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "NEXT_PAGE_TOKEN_KEY",
    "Page",
    "encode_token",
    "resolve_page",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
NEXT_PAGE_TOKEN_KEY = "x-next-page-token"
_TOKEN_VERSION = 1


@dataclass(frozen=True)
class Page:
    """Which rows to read: after a user id (keyset) or at an offset, and how many."""

    size: int
    after_id: int | None
    offset: int


def encode_token(after_id: int) -> str:
    payload = json.dumps({"v": _TOKEN_VERSION, "after": after_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    bad = InvalidArgument(
        [FieldViolation("page_token", "is not a token returned by ListUsers")],
        reason="INVALID_PAGE_TOKEN",
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(payload, dict) or payload.get("v") != _TOKEN_VERSION:
        raise bad
    after = payload.get("after")
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**31:
        raise bad
    return after


def resolve_page(page: int, page_size: int, page_token: str) -> Page:
    """Applies the documented rules: page 0 means 1, size 0 means 50, above 1000 is clamped."""
    violations = []
    if page < 0:
        violations.append(FieldViolation("page", f"must not be negative, got {page}"))
    if page_size < 0:
        violations.append(FieldViolation("page_size", f"must not be negative, got {page_size}"))
    if violations:
        raise InvalidArgument(violations)
    size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if page_token:
        return Page(size=size, after_id=_decode_token(page_token), offset=0)
    return Page(size=size, after_id=None, offset=(max(page, 1) - 1) * size)
