"""A service started with a bad setting exits at once with one line naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from parley.testing.launcher import run_to_exit

GOOD = {
    "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_GRPC_HOST": "127.0.0.1",
    "PARLEY_GRPC_PORT": "0",
    "PARLEY_METRICS_HOST": "127.0.0.1",
    "PARLEY_METRICS_PORT": "0",
}


def serve(settings: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_to_exit("user", settings)
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
