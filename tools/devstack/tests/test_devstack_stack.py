"""The stack's parts that need no servers: what commands get, the banner, the migrations' errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parley.devstack.banner import banner
from parley.devstack.errors import DevstackError
from parley.devstack.ports import free_ports
from parley.devstack.services import migrate
from parley.devstack.stack import MIGRATING_SCRIPTS, Endpoints, unique_redis_prefix


def _endpoints(redis_prefix: str | None = None) -> Endpoints:
    return Endpoints(
        user="127.0.0.1:50051",
        chat="127.0.0.1:50052",
        chat2="127.0.0.1:50053",
        user_metrics="127.0.0.1:9101",
        chat_metrics="127.0.0.1:9102",
        chat2_metrics="127.0.0.1:9103",
        database_url="postgresql://app:s3cret@127.0.0.1:54329/parley",
        redis_url="redis://127.0.0.1:63790/0",
        jwt_secret="k" * 48,
        jwt_issuer="parley",
        jwt_audience="parley",
        redis_prefix=redis_prefix,
    )


def test_a_command_gets_both_chat_replicas() -> None:
    env = _endpoints().command_env()
    assert env["PARLEY_CHAT_ADDR"] == "127.0.0.1:50052"
    assert env["PARLEY_CHAT2_ADDR"] == "127.0.0.1:50053"
    assert env["PARLEY_CHAT_METRICS_ADDR"] == "127.0.0.1:9102"
    assert env["PARLEY_CHAT2_METRICS_ADDR"] == "127.0.0.1:9103"
    assert "PARLEY_REDIS_PREFIX" not in env


def test_a_command_gets_the_redis_prefix_when_there_is_one() -> None:
    env = _endpoints("parley-e2e-0123456789ab").command_env()
    assert env["PARLEY_REDIS_PREFIX"] == "parley-e2e-0123456789ab"


def test_unique_redis_prefixes_are_valid_and_distinct() -> None:
    prefixes = {unique_redis_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    # Well within what PARLEY_REDIS_PREFIX accepts: 1 to 64 of A-Z a-z 0-9 _ . -
    assert all(re.fullmatch(r"parley-e2e-[0-9a-f]{12}", prefix) for prefix in prefixes)


def test_the_banner_lists_both_chat_replicas(tmp_path: Path) -> None:
    lines = banner(_endpoints(), tmp_path / ".parley", secret_from_env=True).splitlines()
    assert lines[3:8] == [
        "  UserService    127.0.0.1:50051    metrics 127.0.0.1:9101",
        "  ChatService    127.0.0.1:50052    metrics 127.0.0.1:9102",
        "  ChatService 2  127.0.0.1:50053    metrics 127.0.0.1:9103",
        "  Postgres       postgresql://app:***@127.0.0.1:54329/parley",
        "  Redis          redis://127.0.0.1:63790/0",
    ]


def test_the_banner_shows_the_redis_prefix_when_there_is_one(tmp_path: Path) -> None:
    text = banner(_endpoints("parley-e2e-0123456789ab"), tmp_path, secret_from_env=True)
    assert (
        "  Redis          redis://127.0.0.1:63790/0    prefix parley-e2e-0123456789ab"
        in text.splitlines()
    )


@pytest.mark.parametrize("script", MIGRATING_SCRIPTS)
def test_a_failed_migration_names_its_command_and_shows_its_output(
    clean_env: dict[str, str], script: str
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    env = {
        **clean_env,
        "PARLEY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/parley",
        "PARLEY_MIGRATE_WAIT": "0s",  # fail on the first attempt instead of retrying for 60 s
    }
    with pytest.raises(DevstackError) as caught:
        migrate(script, env, timeout=30)
    first, *rest = str(caught.value).splitlines()
    assert first == f"{script} migrate failed with code 2:"
    assert rest and rest[0].startswith(f"{script}: postgres is unavailable:"), rest
