"""The embedded Postgres and Redis servers: real processes on free ports in a private directory."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import psycopg
import pytest

from parley.devstack.errors import DevstackError
from parley.devstack.ports import check_free, free_ports
from parley.devstack.postgres import EmbeddedPostgres
from parley.devstack.redis import EmbeddedRedis, ping


def _command(*args: str) -> bytes:
    encoded = f"*{len(args)}\r\n".encode()
    for arg in args:
        encoded += f"${len(arg.encode())}\r\n{arg}\r\n".encode()
    return encoded


def _redis(port: int, password: str, *args: str) -> bytes:
    """The raw reply of Redis to one command after AUTH (sent with a QUIT, so Redis closes the
    connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_command("AUTH", password) + _command(*args) + _command("QUIT"))
        received = b"".join(iter(lambda: sock.recv(4096), b""))
    assert received.startswith(b"+OK\r\n") and received.endswith(b"+OK\r\n"), received
    return received.removeprefix(b"+OK\r\n").removesuffix(b"+OK\r\n")


def test_postgres_serves_queries_and_keeps_data_across_a_restart(data_dir: Path) -> None:
    (port,) = free_ports(1)
    server = EmbeddedPostgres(data_dir / "postgres", port, log_path=data_dir / "postgres.log")
    try:
        server.start(timeout=60, databases=("parley",))
        assert server.initialized
        with psycopg.connect(server.dsn("parley"), autocommit=True) as conn:
            assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
            conn.execute("CREATE TABLE notes (body text)")
            conn.execute("INSERT INTO notes VALUES ('kept')")
        server.stop()
        assert server.process is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn("parley"), connect_timeout=1).close()

        server.start(timeout=60, databases=("parley",))
        with psycopg.connect(server.dsn("parley")) as conn:
            assert conn.execute("SELECT body FROM notes").fetchall() == [("kept",)]
    finally:
        server.stop()
    check_free(port, "Postgres")


def test_redis_answers_and_keeps_data_across_a_restart(data_dir: Path) -> None:
    (port,) = free_ports(1)
    password = secrets.token_urlsafe(24)
    server = EmbeddedRedis(
        data_dir / "redis", port, log_path=data_dir / "redis.log", password=password
    )
    try:
        server.start(timeout=30)
        assert server.url == f"redis://:{password}@127.0.0.1:{port}/0"
        assert ping("127.0.0.1", port, password)
        assert _redis(port, password, "SET", "greeting", "hello") == b"+OK\r\n"
        assert (data_dir / "redis" / "appendonly.aof").is_file()
        server.stop()
        assert not ping("127.0.0.1", port, password)

        server.start(timeout=30)
        assert _redis(port, password, "GET", "greeting") == b"$5\r\nhello\r\n"
    finally:
        server.stop()
    check_free(port, "Redis")


def test_a_busy_port_is_named_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DevstackError) as caught:
            check_free(port, "Redis", hint="choose another with --redis-port")
    message = str(caught.value)
    assert "\n" not in message
    assert f"port {port} for Redis" in message
    assert "--redis-port" in message


def test_free_ports_are_distinct() -> None:
    ports = free_ports(6)
    assert len(set(ports)) == 6
