"""A deployment that kept a secret published in this repository does not start: both
services, as real processes, exit at once with one line naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parley.chassis.sample_secrets import SAMPLE_SECRETS
from parley.devstack.services import Service, ServiceSpec
from parley.testing.launcher import HEALTH_NAMES

FRESH_SECRET = os.urandom(32).hex()
# The compose file's defaults before `make secrets` existed.
OLD_COMPOSE_SECRET = "change-me-this-is-a-local-development-secret"
OLD_COMPOSE_PASSWORD = "parley"


def _serve(directory: Path, kind: str, **settings: str) -> tuple[int | None, str]:
    """Runs `parley-<kind> serve` (as the launcher does, without waiting for it to serve)
    until it exits: (its exit code, everything it wrote)."""
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
    spec = ServiceSpec(f"parley-{kind}", f"parley-{kind}", HEALTH_NAMES[kind], 0, 0)
    service = Service(spec, environ, log_path=directory / f"parley-{kind}.log")
    if not service.process.wait(30):
        service.stop()
        pytest.fail(f"parley-{kind} serve did not exit:\n{service.log_text()}")
    return service.process.returncode, service.log_text()


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
    kind: str, variable: str, settings: dict[str, str], tmp_path: Path
) -> None:
    assert OLD_COMPOSE_SECRET in SAMPLE_SECRETS and OLD_COMPOSE_PASSWORD in SAMPLE_SECRETS
    code, output = _serve(tmp_path, kind, **settings)
    assert code != 0
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert variable in lines[0] and "published in the Parley repository" in lines[0]
    assert OLD_COMPOSE_SECRET not in output, "the refused secret was echoed"


def test_a_published_redis_password_stops_chat(tmp_path: Path) -> None:
    redis_url = f"redis://:{OLD_COMPOSE_PASSWORD}@127.0.0.1:1/0"
    code, output = _serve(tmp_path, "chat", PARLEY_REDIS_URL=redis_url)
    assert code != 0
    lines = output.splitlines()
    assert len(lines) == 1 and "PARLEY_REDIS_URL" in lines[0], output
