"""A deployment that kept a secret published in this repository does not start: both
services, as real processes, exit at once with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parley.chassis.sample_secrets import SAMPLE_SECRETS

BIN = Path(sys.executable).parent
FRESH_SECRET = os.urandom(32).hex()
# The compose file's defaults before `make secrets` existed.
OLD_COMPOSE_SECRET = "change-me-this-is-a-local-development-secret"
OLD_COMPOSE_PASSWORD = "parley"


def _serve(kind: str, **settings: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    environ.update(
        PARLEY_DATABASE_URL="postgresql://parley@127.0.0.1:1/parley",
        PARLEY_REDIS_URL="redis://127.0.0.1:1/0",
        PARLEY_JWT_SECRET=FRESH_SECRET,
        PARLEY_GRPC_HOST="127.0.0.1",
        PARLEY_GRPC_PORT="0",
        PARLEY_METRICS_HOST="127.0.0.1",
        PARLEY_METRICS_PORT="0",
    )
    environ.update(settings)
    return subprocess.run(
        [str(BIN / f"parley-{kind}"), "serve"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


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
    result = _serve(kind, **settings)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and "published in the Parley repository" in lines[0]
    assert OLD_COMPOSE_SECRET not in result.stderr, "the refused secret was echoed"


def test_a_published_redis_password_stops_chat() -> None:
    result = _serve("chat", PARLEY_REDIS_URL=f"redis://:{OLD_COMPOSE_PASSWORD}@127.0.0.1:1/0")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "PARLEY_REDIS_URL" in lines[0], result.stderr
