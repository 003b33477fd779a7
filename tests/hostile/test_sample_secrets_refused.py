"""A deployment that kept a secret published in this repository does not start: both
services, as real processes, exit at once with one line naming the variable."""

from __future__ import annotations

import os

import pytest

from parley.chassis.sample_secrets import SAMPLE_SECRETS
from parley.testing.launcher import run_to_exit

FRESH_SECRET = os.urandom(32).hex()
# The compose file's defaults before `make secrets` existed.
OLD_COMPOSE_SECRET = "change-me-this-is-a-local-development-secret"
OLD_COMPOSE_PASSWORD = "parley"


def _serve(kind: str, **settings: str) -> tuple[int, str, str]:
    """Runs `parley-<kind> serve` until it exits: (its exit code, stdout, stderr)."""
    env = {
        "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
        "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0",
        "PARLEY_JWT_SECRET": FRESH_SECRET,
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_GRPC_PORT": "0",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_METRICS_PORT": "0",
        **settings,
    }
    done = run_to_exit(kind, env)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("kind", ["user", "chat"])
@pytest.mark.parametrize(
    ("variable", "settings"),
    [
        ("PARLEY_JWT_SECRET", {"PARLEY_JWT_SECRET": OLD_COMPOSE_SECRET}),
        (
            "PARLEY_DATABASE_URL",
            {
                "PARLEY_DATABASE_URL": (
                    f"postgresql://parley:{OLD_COMPOSE_PASSWORD}@127.0.0.1:1/parley"
                )
            },
        ),
    ],
)
def test_a_published_secret_stops_start_up(
    kind: str, variable: str, settings: dict[str, str]
) -> None:
    assert OLD_COMPOSE_SECRET in SAMPLE_SECRETS and OLD_COMPOSE_PASSWORD in SAMPLE_SECRETS
    code, stdout, output = _serve(kind, **settings)
    assert code != 0
    assert stdout == ""
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert variable in lines[0] and "published in the Parley repository" in lines[0]
    assert OLD_COMPOSE_SECRET not in output, "the refused secret was echoed"


def test_a_published_redis_password_stops_chat() -> None:
    redis_url = f"redis://:{OLD_COMPOSE_PASSWORD}@127.0.0.1:1/0"
    code, stdout, output = _serve("chat", PARLEY_REDIS_URL=redis_url)
    assert code != 0
    assert stdout == ""
    lines = output.splitlines()
    assert len(lines) == 1 and "PARLEY_REDIS_URL" in lines[0], output
