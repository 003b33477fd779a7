"""Secret values published in the Parley repository, which no deployment may use."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "SAMPLE_PASSWORD_PROBLEM",
    "SAMPLE_SECRET_PROBLEM",
    "SAMPLE_SECRETS",
    "has_sample_password",
    "is_sample_secret",
    "url_password",
]

# Every secret value this repository has ever shown: defaults of docker-compose.yml and
# .env.example, the chart's CI values, placeholders of the docs and the secrets tests used.
# Anyone can sign tokens with these or log in with them, so the services refuse them all.
# tests/deploy/test_sample_secrets.py fails when a tracked file holds a secret not refused.
SAMPLE_SECRETS: frozenset[str] = frozenset(
    {
        # docker-compose.yml and .env.example before `make secrets`.
        "change-me-this-is-a-local-development-secret",
        "parley",
        # deploy/helm/parley/ci/default-values.yaml.
        "ci-only-jwt-secret-at-least-32-bytes-long",
        # Placeholders in URLs of the docs and values.yaml.
        "PASSWORD",
        "password",
        # Inputs of the devstack's password-masking tests.
        "s3cret",
        "pw",
        "a b",
        # JWT secrets of the test suites, before they generated theirs at run time.
        "chassis-test-secret-" + "k" * 32,
        "test-secret-" + "s" * 32,
        "chat-test-secret-" + "c" * 32,
        "faults-test-secret-" + "f" * 32,
        "hostile-test-secret-" + "h" * 32,
        "token-cache-test-secret-" + "s" * 32,
        "another-secret-" + "x" * 32,
        "another-secret-that-is-long-enough-0123",
        "another-secret-that-is-long-enough-for-hs256",
        "a-different-secret-that-is-32-bytes-long",
        "an-existing-secret-of-at-least-32-bytes",
        "a-secret-only-for-listing-metrics-" + "x" * 8,
        "\u20ac" * 11,
        "s" * 32,
        "s" * 40,
        "s" * 48,
        "x" * 32,
        "x" * 48,
        "k" * 48,
    }
)

# The ConfigError problems, after the variable's name.
SAMPLE_SECRET_PROBLEM = (
    "is a sample value published in the Parley repository; "
    "generate one with `make secrets` or `openssl rand -base64 48`"
)
SAMPLE_PASSWORD_PROBLEM = (
    "its password is a sample value published in the Parley repository; "
    "generate one with `make secrets` or `openssl rand -hex 32`"
)

# password=... in a libpq key=value string: a bare word or a single-quoted value.
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def is_sample_secret(value: str) -> bool:
    """True when `value` is a secret published in the Parley repository."""
    return value in SAMPLE_SECRETS


def url_password(url: str) -> str | None:
    """The password of a postgresql://, redis:// or unix:// URL (decoded), or of a libpq
    key=value string; None when it carries none."""
    if "://" not in url:
        found = _KEYWORD_PASSWORD.findall(url)
        if not found:
            return None
        value: str = found[-1]  # libpq takes the last one
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        return value
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6]: the driver reports that, not this check
        return None
    if parts.password is not None:
        return unquote(parts.password)
    passwords = parse_qs(parts.query).get("password")
    return passwords[-1] if passwords else None


def has_sample_password(url: str) -> bool:
    """True when the password in `url` is a secret published in the Parley repository."""
    password = url_password(url)
    return password is not None and is_sample_secret(password)
