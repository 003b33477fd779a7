"""A Redis container's command (`sh -c` with redis-server), run on this machine by devstack."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from parley.devstack.errors import DevstackError
from parley.devstack.processes import Process, wait_until
from parley.testing import free_port
from parley.testing.redis_server import REDIS_SERVER

from .tools import missing_tool


@dataclass
class RedisRun:
    """redis-server started by a container's `sh -c` command; `cli` runs redis-cli as the
    container's probes do, with the environment they would have."""

    process: Process
    port: int
    env: dict[str, str]

    def cli(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        """redis-cli ARGS; a variable given as None is taken out of the environment."""
        full = {k: v for k, v in {**self.env, **env}.items() if v is not None}
        return subprocess.run(
            ["redis-cli", *args], env=full, capture_output=True, text=True, timeout=10
        )

    def cmdline(self) -> str:
        """The server's command line, as `ps` shows it."""
        return Path(f"/proc/{self.process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text + "\n", encoding="utf-8")
    path.chmod(0o755)


def redis_command_env(directory: Path) -> tuple[dict[str, str], int]:
    """The environment to run a Redis container's command (["sh", "-c", script]) in on this
    machine, and the port its server will listen on. The image's entry point stands in as
    `exec "$@"` (what it does for a non-root user); redis-server and redis-cli are pointed
    at a free port of 127.0.0.1 and at `directory`."""
    server = Path(REDIS_SERVER)
    # The redis-cli of the same installation as the server, as in the image.
    client = str(server.with_name("redis-cli"))
    if not os.access(server, os.X_OK) or not os.access(client, os.X_OK):
        missing_tool(f"{server} and redis-cli are needed (PARLEY_TEST_REDIS_SERVER names one)")
    port = free_port()
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(bin_dir / "docker-entrypoint.sh", 'exec "$@"')
    # Options after the stdin "-" override the configuration, as on the command line.
    _script(
        bin_dir / "redis-server",
        f'exec {server} "$@" --port {port} --bind 127.0.0.1 --dir {directory} --save ""',
    )
    _script(bin_dir / "redis-cli", f'exec {client} -p {port} "$@"')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, port


@contextmanager
def run_redis_command(
    command: Sequence[str], env: Mapping[str, str], directory: Path
) -> Iterator[RedisRun]:
    """The command run as `redis_command_env` describes (by devstack, as every server of the
    tests), until the server is ready; stopped afterwards."""
    base, port = redis_command_env(directory)
    full_env = {**base, **env}
    log = directory / "redis-command.log"
    with open(log, "wb") as output:
        process = Process("the Redis container's command", command, env=full_env, output=output)
    try:
        try:
            wait_until(
                lambda: "Ready to accept connections" in log.read_text(errors="replace"),
                timeout=10,
                what="redis-server to accept connections",
                watch=[process],
            )
        except DevstackError as exc:
            pytest.fail(f"redis-server did not start: {exc}\n{log.read_text(errors='replace')}")
        yield RedisRun(process, port, full_env)
    finally:
        process.stop(signal.SIGTERM, 10)
