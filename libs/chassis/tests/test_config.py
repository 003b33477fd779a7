"""Settings from PARLEY_* variables: defaults, parsing, and one-line errors naming the variable."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env, ServerSettings

SECRET = secrets.token_urlsafe(32)
DB_URL = "postgresql://parley@127.0.0.1:5432/parley"


def server(environ: dict[str, str]) -> ServerSettings:
    return ServerSettings.from_env(Env(environ), default_port=50051, default_metrics_port=9101)


def assert_one_line_error(error: ConfigError, variable: str, *fragments: str) -> None:
    text = str(error)
    assert "\n" not in text and "\r" not in text
    assert text.startswith(f"{variable}: ")
    assert error.variable == variable
    for fragment in fragments:
        assert fragment in text


@pytest.fixture(scope="module")
def rsa_public_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- Env ---------------------------------------------------------------------------------


def test_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_TEST_ONLY_VALUE", "  hello  ")
    assert Env().string("PARLEY_TEST_ONLY_VALUE") == "hello"
    assert os.environ["PARLEY_TEST_ONLY_VALUE"] == "  hello  "


def test_blank_values_count_as_unset() -> None:
    env = Env({"A": "   ", "B": ""})
    assert env.raw("A") is None
    assert env.optional("B") is None
    assert env.string("A", "fallback") == "fallback"
    assert env.port("A", 1234) == 1234
    assert env.seconds("B", 2.5) == 2.5


def test_required_string_missing() -> None:
    with pytest.raises(ConfigError) as info:
        Env({}).string("PARLEY_SOMETHING")
    assert_one_line_error(info.value, "PARLEY_SOMETHING", "required")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        ("1h", 3600.0),
        (" 250 ms ", 0.25),
        ("0", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert Env({"D": text}).seconds("D", 99.0) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10 parsecs", "-1s", "1e3", "s", "1.5.2s", "10 s s", "ten"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Env({"PARLEY_SHUTDOWN_GRACE": text}).seconds("PARLEY_SHUTDOWN_GRACE", 1.0)
    assert_one_line_error(info.value, "PARLEY_SHUTDOWN_GRACE", "duration", repr(text.strip()))


def test_duration_out_of_range() -> None:
    with pytest.raises(ConfigError) as info:
        Env({"D": "2h"}).seconds("D", 1.0, maximum=3600)
    assert_one_line_error(info.value, "D", "between", "'2h'")
    with pytest.raises(ConfigError):
        Env({"D": "10ms"}).seconds("D", 1.0, minimum=0.05)


# --- ServerSettings ----------------------------------------------------------------------


def test_server_defaults() -> None:
    settings = server({})
    assert settings.host == "0.0.0.0"
    assert settings.port == 50051
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port == 9101
    assert settings.shutdown_grace == 10.0
    assert settings.shutdown_delay == 0.0
    assert settings.keepalive_time == 30.0
    assert settings.keepalive_timeout == 10.0
    assert settings.max_connection_age == 0.0
    assert settings.max_connection_age_grace == 30.0
    assert settings.health_check_interval == 5.0
    assert settings.log_format == "plain"
    assert settings.log_level == "INFO"
    assert settings.address == "0.0.0.0:50051"


def test_server_values() -> None:
    settings = server(
        {
            "PARLEY_GRPC_HOST": "127.0.0.1",
            "PARLEY_GRPC_PORT": " 6000 ",
            "PARLEY_METRICS_PORT": "0",
            "PARLEY_SHUTDOWN_GRACE": "500ms",
            "PARLEY_SHUTDOWN_DELAY": "2m",
            "PARLEY_KEEPALIVE_TIME": "1.5s",
            "PARLEY_HEALTH_CHECK_INTERVAL": "100ms",
            "PARLEY_MAX_CONNECTION_AGE": "5m",
            "PARLEY_LOG_FORMAT": "json",
            "PARLEY_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.address == "127.0.0.1:6000"
    assert settings.metrics_port == 0
    assert settings.shutdown_grace == pytest.approx(0.5)
    assert settings.shutdown_delay == pytest.approx(120.0)
    assert settings.keepalive_time == pytest.approx(1.5)
    assert settings.health_check_interval == pytest.approx(0.1)
    assert settings.max_connection_age == pytest.approx(300.0)
    assert settings.log_format == "json"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        ("PARLEY_GRPC_PORT", "abc", ("integer", "'abc'")),
        ("PARLEY_GRPC_PORT", "70000", ("between 0 and 65535", "70000")),
        ("PARLEY_GRPC_PORT", "-1", ("between 0 and 65535",)),
        ("PARLEY_GRPC_PORT", "80.5", ("integer",)),
        ("PARLEY_METRICS_PORT", "http", ("integer",)),
        ("PARLEY_METRICS_PORT", "65536", ("65535",)),
        ("PARLEY_SHUTDOWN_GRACE", "10 parsecs", ("duration", "'10 parsecs'")),
        ("PARLEY_SHUTDOWN_GRACE", "2h", ("between",)),
        ("PARLEY_SHUTDOWN_DELAY", "soon", ("duration",)),
        ("PARLEY_KEEPALIVE_TIME", "100ms", ("between 1s",)),
        ("PARLEY_KEEPALIVE_TIMEOUT", "0", ("between 1s",)),
        ("PARLEY_MAX_CONNECTION_AGE", "forever", ("duration",)),
        ("PARLEY_HEALTH_CHECK_INTERVAL", "1ms", ("between",)),
        ("PARLEY_LOG_FORMAT", "xml", ("one of plain, json", "'xml'")),
        ("PARLEY_LOG_LEVEL", "LOUD", ("one of DEBUG, INFO, WARNING, ERROR", "'LOUD'")),
        ("PARLEY_MAX_UNARY_CALLS", "0", ()),
        ("PARLEY_MAX_UNARY_CALLS", "many", ()),
    ],
)
def test_server_bad_values(variable: str, value: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        server({variable: value})
    assert_one_line_error(info.value, variable, *fragments)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        server({"PARLEY_GRPC_PORT": "x"})


# --- DatabaseSettings --------------------------------------------------------------------


def test_database_defaults() -> None:
    settings = DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": DB_URL}))
    assert settings.url == DB_URL
    assert (settings.pool_min, settings.pool_max, settings.pool_timeout) == (1, 10, 5.0)


def test_database_values() -> None:
    settings = DatabaseSettings.from_env(
        Env(
            {
                "PARLEY_DATABASE_URL": "host=db dbname=parley",
                "PARLEY_DB_POOL_MIN": "2",
                "PARLEY_DB_POOL_MAX": "2",
                "PARLEY_DB_POOL_TIMEOUT": "250ms",
            }
        )
    )
    assert settings.url == "host=db dbname=parley"
    assert (settings.pool_min, settings.pool_max) == (2, 2)
    assert settings.pool_timeout == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("environ", "variable", "fragment"),
    [
        ({}, "PARLEY_DATABASE_URL", "required"),
        ({"PARLEY_DATABASE_URL": "mysql://x/y"}, "PARLEY_DATABASE_URL", "postgresql://"),
        ({"PARLEY_DATABASE_URL": DB_URL, "PARLEY_DB_POOL_MIN": "x"}, "PARLEY_DB_POOL_MIN", "'x'"),
        ({"PARLEY_DATABASE_URL": DB_URL, "PARLEY_DB_POOL_MAX": "0"}, "PARLEY_DB_POOL_MAX", "1"),
        (
            {"PARLEY_DATABASE_URL": DB_URL, "PARLEY_DB_POOL_MIN": "5", "PARLEY_DB_POOL_MAX": "4"},
            "PARLEY_DB_POOL_MAX",
            "PARLEY_DB_POOL_MIN (5)",
        ),
        (
            {"PARLEY_DATABASE_URL": DB_URL, "PARLEY_DB_POOL_TIMEOUT": "1 fortnight"},
            "PARLEY_DB_POOL_TIMEOUT",
            "duration",
        ),
    ],
)
def test_database_bad_values(environ: dict[str, str], variable: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DatabaseSettings.from_env(Env(environ))
    assert_one_line_error(info.value, variable, fragment)


# --- AuthSettings ------------------------------------------------------------------------


def test_auth_defaults() -> None:
    settings = AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": SECRET}))
    assert settings.algorithm == "HS256"
    assert settings.issuer == "parley"
    assert settings.audience == "parley"
    assert settings.leeway == 30.0
    assert settings.secret == SECRET
    assert settings.public_key is None and settings.jwks is None


def test_auth_values() -> None:
    settings = AuthSettings.from_env(
        Env(
            {
                "PARLEY_JWT_SECRET": SECRET,
                "PARLEY_JWT_ISSUER": "https://issuer.example",
                "PARLEY_JWT_AUDIENCE": "chat",
                "PARLEY_JWT_LEEWAY": "1500ms",
            }
        )
    )
    assert (settings.issuer, settings.audience) == ("https://issuer.example", "chat")
    assert settings.leeway == pytest.approx(1.5)


def test_missing_secret() -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({}))
    assert_one_line_error(info.value, "PARLEY_JWT_SECRET", "required")


def test_short_secret() -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": "s" * 31}))
    assert_one_line_error(info.value, "PARLEY_JWT_SECRET", "32 bytes")


def test_secret_length_counts_bytes() -> None:
    # 11 three-byte characters (CJK ideographs) are 33 bytes; 10 are too few.
    secret = "".join(chr(0x4E00 + secrets.randbelow(0x5000)) for _ in range(11))
    assert AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": secret})).secret == secret
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": secret[:10]}))
    assert_one_line_error(info.value, "PARLEY_JWT_SECRET", "32 bytes")


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("PARLEY_JWT_ALGORITHM", "none", "one of HS256, RS256"),
        ("PARLEY_JWT_ALGORITHM", "hs256", "'hs256'"),
        ("PARLEY_JWT_LEEWAY", "a while", "duration"),
        ("PARLEY_JWT_LEEWAY", "1h", "between"),
    ],
)
def test_auth_bad_values(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": SECRET, variable: value}))
    assert_one_line_error(info.value, variable, fragment)


def test_rs256_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_ALGORITHM": "RS256"}))
    assert_one_line_error(info.value, "PARLEY_JWT_PUBLIC_KEY_FILE", "exactly one")


def test_rs256_rejects_both_key_sources(tmp_path: Path, rsa_public_pem: bytes) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa_public_pem)
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(
            Env(
                {
                    "PARLEY_JWT_ALGORITHM": "RS256",
                    "PARLEY_JWT_PUBLIC_KEY_FILE": str(pem),
                    "PARLEY_JWT_JWKS_FILE": str(pem),
                }
            )
        )
    assert_one_line_error(info.value, "PARLEY_JWT_PUBLIC_KEY_FILE", "exactly one")


def test_rs256_public_key_file(tmp_path: Path, rsa_public_pem: bytes) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa_public_pem)
    settings = AuthSettings.from_env(
        Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_PUBLIC_KEY_FILE": str(pem)})
    )
    assert settings.algorithm == "RS256"
    assert settings.public_key == rsa_public_pem.decode()
    assert settings.secret is None and settings.jwks is None


def test_rs256_jwks_file(tmp_path: Path, rsa_public_pem: bytes) -> None:
    public_key = serialization.load_pem_public_key(rsa_public_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    settings = AuthSettings.from_env(
        Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_JWKS_FILE": str(path)})
    )
    assert settings.jwks is not None
    assert [k.key_id for k in settings.jwks.keys] == ["k1"]
    assert settings.public_key is None and settings.secret is None


@pytest.mark.parametrize("variable", ["PARLEY_JWT_PUBLIC_KEY_FILE", "PARLEY_JWT_JWKS_FILE"])
def test_rs256_unreadable_key_file(tmp_path: Path, variable: str) -> None:
    missing = tmp_path / "nowhere" / "key"
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_ALGORITHM": "RS256", variable: str(missing)}))
    assert_one_line_error(info.value, variable, str(missing), "No such file")


@pytest.mark.parametrize("variable", ["PARLEY_JWT_PUBLIC_KEY_FILE", "PARLEY_JWT_JWKS_FILE"])
def test_rs256_key_file_is_a_directory(tmp_path: Path, variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_ALGORITHM": "RS256", variable: str(tmp_path)}))
    assert_one_line_error(info.value, variable, str(tmp_path))


@pytest.mark.parametrize("variable", ["PARLEY_JWT_PUBLIC_KEY_FILE", "PARLEY_JWT_JWKS_FILE"])
def test_rs256_binary_key_file(tmp_path: Path, variable: str, rsa_public_pem: bytes) -> None:
    # A DER key where a PEM or JSON file is expected.
    key = serialization.load_pem_public_key(rsa_public_pem)
    der = tmp_path / "key.der"
    der.write_bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1) + b"\xff\xfe"
    )
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_ALGORITHM": "RS256", variable: str(der)}))
    assert_one_line_error(info.value, variable, str(der))


def test_rs256_public_key_file_is_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(
            Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_PUBLIC_KEY_FILE": str(path)})
        )
    assert_one_line_error(info.value, "PARLEY_JWT_PUBLIC_KEY_FILE", "not a PEM public key")


def test_rs256_public_key_file_with_a_broken_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(
            Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_PUBLIC_KEY_FILE": str(path)})
        )
    assert_one_line_error(info.value, "PARLEY_JWT_PUBLIC_KEY_FILE", str(path))


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "",
        "{}",
        '{"keys": []}',
        '{"keys": [{"kty": "nonsense"}]}',
        '{"keys": "abc"}',
        "[1, 2]",
        '"a string"',
    ],
)
def test_rs256_bad_jwks(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(
            Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_JWKS_FILE": str(path)})
        )
    assert_one_line_error(info.value, "PARLEY_JWT_JWKS_FILE", str(path), "not a JWKS")


def test_rs256_public_key_file_with_an_ec_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(
            Env({"PARLEY_JWT_ALGORITHM": "RS256", "PARLEY_JWT_PUBLIC_KEY_FILE": str(path)})
        )
    assert_one_line_error(info.value, "PARLEY_JWT_PUBLIC_KEY_FILE", "RSA")


def test_log_level_ignores_case() -> None:
    settings = ServerSettings.from_env(
        Env({"PARLEY_LOG_LEVEL": "debug"}), default_port=1, default_metrics_port=2
    )
    assert settings.log_level == "DEBUG"
