"""Field rules for users; each broken rule becomes a `google.rpc.BadRequest` field violation."""

from __future__ import annotations

import re
import unicodedata

from parley.chassis import FieldViolation, InvalidArgument

__all__ = [
    "MAX_AGE",
    "MAX_EMAIL_LENGTH",
    "MAX_NAME_LENGTH",
    "check",
    "email_problem",
    "id_problem",
    "age_problem",
    "name_problem",
]

MAX_NAME_LENGTH = 100
MAX_EMAIL_LENGTH = 254
MAX_AGE = 150

# Deliberately simple: one @, no spaces, a dot in the domain. Deliverability is not checked.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


def _has_control_characters(text: str) -> bool:
    """C0 and C1 controls and DEL (category Cc), or a lone surrogate (Cs)."""
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def id_problem(value: int) -> str | None:
    return "must be a positive integer" if value <= 0 else None


def name_problem(value: str) -> str | None:
    name = value.strip()
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)}"
    if _has_control_characters(name):
        return "must not contain control characters"
    return None


def email_problem(value: str) -> str | None:
    email = value.strip()
    if not email:
        return "must not be empty"
    if len(email) > MAX_EMAIL_LENGTH:
        return f"must be at most {MAX_EMAIL_LENGTH} characters, got {len(email)}"
    if _has_control_characters(email):
        return "must not contain control characters"
    if not _EMAIL.match(email):
        return "must be an email address such as ada@example.com"
    return None


def age_problem(value: int) -> str | None:
    if not 0 <= value <= MAX_AGE:
        return f"must be between 0 and {MAX_AGE}, got {value}"
    return None


def check(*problems: tuple[str, str | None]) -> None:
    """Raises InvalidArgument listing every (field, problem) whose problem is not None."""
    violations = [FieldViolation(field, problem) for field, problem in problems if problem]
    if violations:
        raise InvalidArgument(violations)
