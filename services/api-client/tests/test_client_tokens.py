"""Token minting, lifetimes and the secret lookup behind `parley token`."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from parley.client.tokens import find_secret, mint_token, parse_ttl

SECRET = "x" * 48


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("24h", 86400), ("2d", 172800), ("90", 90)],
)
def test_ttl_accepts_durations(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "1w", "1.5h", "-1h", "h"])
def test_ttl_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


def test_minted_tokens_carry_every_claim() -> None:
    token = mint_token(
        SECRET, "7", ["users:write", "users:write", "chat"], ttl=60, issuer="i", audience="a",
        now=1_000,
    )  # fmt: skip
    claims = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience="a", issuer="i", options={"verify_exp": False}
    )
    assert claims == {
        "sub": "7",
        "iss": "i",
        "aud": "a",
        "iat": 1_000,
        "nbf": 1_000,
        "exp": 1_060,
        "scope": "users:write chat",
    }


def test_no_scopes_means_no_scope_claim() -> None:
    claims = jwt.decode(mint_token(SECRET, "2"), SECRET, algorithms=["HS256"], audience="parley")
    assert "scope" not in claims


def test_secret_lookup_order(tmp_path: Path) -> None:
    (tmp_path / ".parley").mkdir()
    (tmp_path / ".parley" / "jwt-secret").write_text("from-file\n")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    env = {"PARLEY_JWT_SECRET": "from-env"}
    assert find_secret("explicit", environ=env, start=below) == "explicit"
    assert find_secret(None, environ=env, start=below) == "from-env"
    assert find_secret(None, environ={}, start=below) == "from-file"
    assert find_secret(None, environ={}, start=tmp_path / "a") == "from-file"


def test_no_secret_anywhere(tmp_path: Path) -> None:
    assert find_secret(None, environ={"PARLEY_JWT_SECRET": "  "}, start=tmp_path) is None
