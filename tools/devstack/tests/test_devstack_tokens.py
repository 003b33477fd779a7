"""The stack's JWT secret file, and `parley token` signing with it."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt

from parley.devstack.credentials import load_or_create_secret, mint_token

PARLEY = Path(sys.executable).parent / "parley"


def _decode(token: str, secret: str) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience="parley",
        issuer="parley",
        options={"require": ["sub", "iss", "aud", "iat", "nbf", "exp"]},
    )
    return claims


def test_the_secret_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / ".parley" / "jwt-secret"
    secret = load_or_create_secret(path)
    assert len(secret.encode()) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    assert load_or_create_secret(tmp_path / "elsewhere" / "jwt-secret") != secret


def test_parley_token_signs_with_the_stack_secret(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    secret = load_or_create_secret(tmp_path / ".parley" / "jwt-secret")
    nested = tmp_path / "src" / "deeper"
    nested.mkdir(parents=True)
    before = int(time.time())
    result = subprocess.run(
        [str(PARLEY), "token", "--sub", "1", "--scope", "users:write", "--scope", "chat:read",
         "--ttl", "15m"],
        cwd=nested,
        env=clean_env,
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    claims = _decode(result.stdout.strip(), secret)
    assert claims["sub"] == "1"
    assert claims["scope"] == "users:write chat:read"
    assert isinstance(claims["iat"], int) and before <= claims["iat"] <= int(time.time())
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] == claims["iat"] + 15 * 60


def test_parley_token_prefers_the_environment_and_omits_empty_scopes(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    load_or_create_secret(tmp_path / ".parley" / "jwt-secret")
    secret = "s" * 40
    result = subprocess.run(
        [str(PARLEY), "token", "--sub", "2"],
        cwd=tmp_path,
        env={**clean_env, "PARLEY_JWT_SECRET": secret},
        capture_output=True,
        text=True,
        check=True,
    )
    claims = _decode(result.stdout.strip(), secret)
    assert claims["sub"] == "2"
    assert "scope" not in claims
    assert claims["exp"] == claims["iat"] + 3600  # type: ignore[operator]


def test_parley_token_without_a_secret_exits_2_with_one_line(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [str(PARLEY), "token", "--sub", "1"],
        cwd=tmp_path,
        env=clean_env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "--secret" in lines[0] and "PARLEY_JWT_SECRET" in lines[0]


def test_the_stack_mints_tokens_the_services_accept() -> None:
    secret = "k" * 48
    claims = _decode(mint_token(secret, "1", ("users:write",)), secret)
    assert claims["sub"] == "1"
    assert claims["scope"] == "users:write"
    assert "scope" not in _decode(mint_token(secret, "2"), secret)
