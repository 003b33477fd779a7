"""Secrets published in the repository are refused at start-up, with one line naming the
variable; generated ones, and URLs without a password, are accepted."""

from __future__ import annotations

import secrets
from urllib.parse import quote

import pytest

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env
from parley.chassis.sample_secrets import SAMPLE_SECRETS, has_sample_password, url_password

# What docker-compose.yml and .env.example shipped before `make secrets` existed.
COMPOSE_JWT_SECRET = "change-me-this-is-a-local-development-secret"
COMPOSE_PASSWORD = "parley"


def database(url: str) -> DatabaseSettings:
    return DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url}))


def assert_refused(error: ConfigError, variable: str) -> None:
    text = str(error)
    assert "\n" not in text
    assert error.variable == variable
    assert text.startswith(f"{variable}: ")
    assert "sample value published in the Parley repository" in text
    assert "make secrets" in text


def test_the_old_compose_jwt_secret_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": COMPOSE_JWT_SECRET}))
    assert_refused(info.value, "PARLEY_JWT_SECRET")
    assert str(info.value) == (
        "PARLEY_JWT_SECRET: is a sample value published in the Parley repository; "
        "generate one with `make secrets` or `openssl rand -base64 48`"
    )


@pytest.mark.parametrize(
    "secret", sorted(s for s in SAMPLE_SECRETS if len(s.encode()) >= 32), ids=repr
)
def test_every_long_enough_sample_is_refused_as_the_jwt_secret(secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": secret}))
    assert_refused(info.value, "PARLEY_JWT_SECRET")


@pytest.mark.parametrize("password", sorted(SAMPLE_SECRETS), ids=repr)
def test_every_sample_is_refused_as_the_database_password(password: str) -> None:
    with pytest.raises(ConfigError) as info:
        database(f"postgresql://parley:{quote(password, safe='')}@db:5432/parley")
    assert_refused(info.value, "PARLEY_DATABASE_URL")


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://parley:{COMPOSE_PASSWORD}@postgres:5432/parley",
        f"postgres://app:{COMPOSE_PASSWORD}@db/parley?sslmode=require",
        "postgresql://app:%70arley@db/parley",  # percent-encoded "parley"
        f"postgresql://app@db/parley?password={COMPOSE_PASSWORD}",
        f"host=db user=app password={COMPOSE_PASSWORD} dbname=parley",
        f"host=db user=app password = '{COMPOSE_PASSWORD}' dbname=parley",
    ],
)
def test_a_sample_database_password_is_refused_in_every_url_form(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        database(url)
    assert_refused(info.value, "PARLEY_DATABASE_URL")
    assert url not in str(info.value)  # the error never repeats the URL, password and all


def test_generated_secrets_and_urls_without_a_password_are_accepted() -> None:
    secret = secrets.token_urlsafe(32)
    assert AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": secret})).secret == secret
    password = secrets.token_urlsafe(32)
    for url in (
        f"postgresql://parley:{password}@db:5432/parley",
        "postgresql://parley@db:5432/parley",  # the user name is no password
        f"host=db user=parley password={password} dbname=parley",
        "host=db user=parley dbname=parley",
    ):
        assert database(url).url == url


# Made at run time: a password written here would be a published one.
P = secrets.token_urlsafe(12)


@pytest.mark.parametrize(
    ("url", "password"),
    [
        (f"redis://:{P}%40x@redis:6379/0", f"{P}@x"),  # percent-encoded
        (f"rediss://default:{P}@redis:6380/0", P),
        (f"unix:///run/redis.sock?db=0&password={P}", P),
        ("redis://redis:6379/0", None),
        ("postgresql://app@db/parley", None),
        (f"host=db password='{P}\\'x' dbname=x", f"{P}'x"),
        (f"password={P}x password={P}", P),  # libpq takes the last
        ("redis://[::1/0", None),  # malformed: the driver reports it, not this check
    ],
    ids=["encoded", "user", "query", "none", "no-password", "quoted", "last", "malformed"],
)
def test_url_password(url: str, password: str | None) -> None:
    assert url_password(url) == password


def test_has_sample_password() -> None:
    assert has_sample_password(f"redis://:{COMPOSE_PASSWORD}@redis:6379/0")
    assert not has_sample_password(f"redis://:{secrets.token_urlsafe(32)}@redis:6379/0")
    assert not has_sample_password("redis://redis:6379/0")
