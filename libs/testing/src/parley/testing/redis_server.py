"""A redis-server of a test's own, which the test may stop and start again on the same port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest

from parley.testing.network import free_port
from parley.testing.waiting import wait_until

__all__ = ["REDIS_SERVER", "RedisServer"]

REDIS_SERVER = os.environ.get("PARLEY_TEST_REDIS_SERVER", "/usr/bin/redis-server")


def _answers(port: int) -> bool:
    """True when a server on 127.0.0.1:`port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server on a fixed port of 127.0.0.1, keeping nothing on disk."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Starts the server and waits until it answers PING."""
        assert self.process is None, "redis-server is already running"
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
                + ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
                + ["--protected-mode", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process

        async def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited:\n{self._log.read_text(errors='replace')}")
            return await asyncio.to_thread(_answers, self.port)

        await wait_until(up, 10, f"redis-server on port {self.port} to answer PING")

    async def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 10 s); a no-op when it is not running."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
