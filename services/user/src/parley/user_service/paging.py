"""ListUsers paging (AIP-158): page size rules and opaque keyset page tokens."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from parley.chassis import FieldViolation, InvalidArgument
from parley.proto.contract import NEXT_PAGE_TOKEN_KEY

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "MAX_PAGE_TOKEN_LENGTH",
    "NEXT_PAGE_TOKEN_KEY",
    "Page",
    "encode_token",
    "resolve_page",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# ListUsers issues tokens of 35 characters at most; a text over this length is refused unread.
MAX_PAGE_TOKEN_LENGTH = 64
_TOKEN_VERSION = 1
_MAX_ID = 2**31 - 1

# A token is unpadded URL-safe base64 of `{"v":1,"after":<id>}`, the compact JSON that every
# version so far has issued. It is matched as exactly that text, never handed to a JSON parser.
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_PAYLOAD = re.compile(rb'\{"v":(\d{1,3}),"after":(0|[1-9]\d{0,9})\}')


@dataclass(frozen=True)
class Page:
    """Which rows to read: after a user id (keyset) or at an offset, and how many."""

    size: int
    after_id: int | None
    offset: int


def encode_token(after_id: int) -> str:
    payload = f'{{"v":{_TOKEN_VERSION},"after":{after_id}}}'.encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _invalid_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)], reason="INVALID_PAGE_TOKEN")


def _decode_token(token: str) -> int:
    """The user id a token continues after; INVALID_ARGUMENT for any text ListUsers never issued."""
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise _invalid_token(
            f"is not a token returned by ListUsers (those are at most "
            f"{MAX_PAGE_TOKEN_LENGTH} characters, got {len(token)})"
        )
    if not _TOKEN_TEXT.fullmatch(token):
        raise _invalid_token("is not a token returned by ListUsers (not URL-safe base64)")
    unpadded = token.rstrip("=")
    try:
        payload = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        raise _invalid_token("is not a token returned by ListUsers (not URL-safe base64)") from None
    match = _PAYLOAD.fullmatch(payload)
    if match is None or int(match[1]) != _TOKEN_VERSION or int(match[2]) > _MAX_ID:
        raise _invalid_token("is not a token returned by ListUsers")
    return int(match[2])


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
