"""A service started with a bad setting exits at once with one line naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARLEY_USER = Path(sys.executable).parent / "parley-user"

GOOD = {
    "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_GRPC_HOST": "127.0.0.1",
    "PARLEY_GRPC_PORT": "0",
    "PARLEY_METRICS_HOST": "127.0.0.1",
    "PARLEY_METRICS_PORT": "0",
}


def clean_environ(**settings: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    environ.update(settings)
    return environ


def serve(settings: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    assert PARLEY_USER.exists(), f"console script not installed at {PARLEY_USER}"
    started = time.monotonic()
    result = subprocess.run(
        [str(PARLEY_USER), "serve"],
        env=clean_environ(**settings),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PARLEY_GRPC_PORT", "abc"),
        ("PARLEY_JWT_SECRET", None),
        ("PARLEY_SHUTDOWN_GRACE", "10 parsecs"),
    ],
)
def test_serve_with_a_bad_setting_exits_with_one_line(variable: str, value: str | None) -> None:
    settings = dict(GOOD)
    if value is None:
        del settings[variable]
    else:
        settings[variable] = value
    result, elapsed = serve(settings)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert elapsed < 15


def test_serve_on_a_taken_port_exits_without_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, elapsed = serve({**GOOD, "PARLEY_GRPC_PORT": str(port)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("parley-user: ")
    assert f"127.0.0.1:{port}" in last
    assert elapsed < 15
