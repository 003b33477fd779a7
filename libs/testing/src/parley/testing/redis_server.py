"""A redis-server of a test's own, which the test may stop and start again on the same port:
optionally with a password, ACL users and TLS (mutual, with certificates made for it)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from parley.testing.certificates import CertificateAuthority, KeyPair
from parley.testing.network import free_port
from parley.testing.waiting import wait_until

__all__ = ["REDIS_SERVER", "RedisServer"]

REDIS_SERVER = os.environ.get("PARLEY_TEST_REDIS_SERVER", "/usr/bin/redis-server")


def _command(*args: str) -> bytes:
    encoded = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        encoded += b"$%d\r\n%s\r\n" % (len(data), data)
    return encoded


def _exchange(sock: socket.socket, request: bytes, expected: bytes) -> bool:
    """Sends `request` and tells whether the reply is `expected`."""
    sock.sendall(request)
    reply = b""
    while len(reply) < len(expected):
        chunk = sock.recv(64)
        if not chunk:
            break
        reply += chunk
    return reply == expected


def _quoted(value: str | Path) -> str:
    """`value` as one argument of a redis.conf line."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class RedisServer:
    """A redis-server on a fixed port of 127.0.0.1, keeping nothing on disk.

    `password` is the default user's (`requirepass`); `users` adds ACL users (name: password)
    with `user_rules` (all keys, channels and commands unless given; a mapping gives each
    user's), and without `password`
    switches the default user off. With `tls` the port
    speaks only TLS and requires a client certificate; `url` carries the CA and the client's
    certificate and key as redis-py query parameters. Secrets go in a 0600 configuration file,
    never on the command line.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        users: Mapping[str, str] | None = None,
        user_rules: str | Mapping[str, str] = "~* &* +@all",
        tls: bool = False,
        executable: str = REDIS_SERVER,
    ) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.password = password
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / f"redis-{self.port}.log"
        self.ca: CertificateAuthority | None = None
        self.client_pair: KeyPair | None = None
        lines = [
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {_quoted(directory)}",
            "protected-mode no",
        ]
        if tls:
            self.ca = CertificateAuthority(directory, f"redis-{self.port}")
            server = self.ca.server()
            self.client_pair = self.ca.client("parley-chat")
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {_quoted(server.cert_file)}",
                f"tls-key-file {_quoted(server.key_file)}",
                f"tls-ca-cert-file {_quoted(self.ca.cert_file)}",
                "tls-auth-clients yes",
            ]
        else:
            lines.append(f"port {self.port}")
        if password is not None:
            lines.append(f"requirepass {_quoted(password)}")
        elif users:
            lines.append("user default off")  # only the ACL users may connect
        for name, secret in (users or {}).items():
            rules = user_rules if isinstance(user_rules, str) else user_rules[name]
            lines.append(f"user {name} on {_quoted('>' + secret)} {rules}")
        # The credentials that the readiness probe uses.
        self._auth: tuple[str, ...] | None = None
        if password is not None:
            self._auth = (password,)
        elif users:
            self._auth = next(iter(users.items()))
        self.config = directory / f"redis-{self.port}.conf"
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """The URL of the server as its default user (with `password` when there is one)."""
        return self.url_for(password=self.password)

    def url_for(self, username: str | None = None, password: str | None = None) -> str:
        """A URL of the server with these credentials (and the TLS files when it uses TLS)."""
        credentials = ""
        if password is not None:
            credentials = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        if self.ca is None or self.client_pair is None:
            return f"redis://{credentials}127.0.0.1:{self.port}/0"
        query = urlencode(
            {
                "ssl_ca_certs": str(self.ca.cert_file),
                "ssl_certfile": str(self.client_pair.cert_file),
                "ssl_keyfile": str(self.client_pair.key_file),
            }
        )
        return f"rediss://{credentials}127.0.0.1:{self.port}/0?{query}"

    def _answers(self) -> bool:
        """True when the server answers PING (after AUTH, over TLS when it uses TLS)."""
        request = b"" if self._auth is None else _command("AUTH", *self._auth)
        request += _command("PING")
        expected = (b"" if self._auth is None else b"+OK\r\n") + b"+PONG\r\n"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                if self.ca is None or self.client_pair is None:
                    return _exchange(raw, request, expected)
                context = ssl.create_default_context(cafile=self.ca.cert_file)
                context.load_cert_chain(self.client_pair.cert_file, self.client_pair.key_file)
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return _exchange(tls, request, expected)
        except OSError:  # ssl.SSLError is one
            return False

    async def start(self) -> None:
        """Starts the server and waits until it answers PING."""
        assert self.process is None, "redis-server is already running"
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                [self.executable, str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process

        async def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited:\n{self._log.read_text(errors='replace')}")
            return await asyncio.to_thread(self._answers)

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
