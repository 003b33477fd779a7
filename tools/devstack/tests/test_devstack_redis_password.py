"""The embedded Redis of `make run` requires a password: made once and kept in
`.parley/redis-password` (mode 0600) like the JWT secret, given to redis-server in a 0600
configuration file (never on its command line) and to the services in PARLEY_REDIS_URL. The
banner and the logs never show it."""

from __future__ import annotations

import contextlib
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from parley.devstack.credentials import REDIS_PASSWORD_FILE_NAME
from parley.devstack.errors import DevstackError
from parley.devstack.ports import free_ports
from parley.devstack.processes import wait_until
from parley.devstack.redis import CONFIG_FILE_NAME, EmbeddedRedis, ping

DEVSTACK = Path(sys.executable).parent / "parley-devstack"
PORT_FLAGS = ("postgres", "redis", "user", "chat", "chat2", "user-metrics", "chat-metrics",
              "chat2-metrics")  # fmt: skip


def _redis_processes(port: int) -> list[Path]:
    """The /proc directories of the redis-server listening on `port` (its title names it)."""
    found = []
    for directory in Path("/proc").glob("[0-9]*"):
        try:
            title = (directory / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if b"redis-server" in title and f"127.0.0.1:{port}".encode() in title:
            found.append(directory)
    return found


def _shows(process: Path, secret: str) -> bool:
    """Whether the command line or the environment of a process holds `secret`."""
    return any(secret.encode() in (process / part).read_bytes() for part in ("cmdline", "environ"))


def test_the_embedded_redis_refuses_clients_without_its_password(data_dir: Path) -> None:
    (port,) = free_ports(1)
    password = secrets.token_urlsafe(24)
    server = EmbeddedRedis(
        data_dir / "redis", port, log_path=data_dir / "redis.log", password=password
    )
    try:
        server.start(timeout=30)
        config = data_dir / "redis" / CONFIG_FILE_NAME
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert password in config.read_text()
        assert server.process is not None
        assert str(config) in server.process.argv
        assert not any(password in arg for arg in server.process.argv)
        processes = _redis_processes(port)
        assert len(processes) == 1 and not _shows(processes[0], password)
        assert ping("127.0.0.1", port, password)
        assert not ping("127.0.0.1", port)
        assert not ping("127.0.0.1", port, "not-the-password")
        with redis.Redis(port=port, socket_timeout=5) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        with redis.Redis.from_url(server.url, socket_timeout=5) as client:
            assert client.ping()
    finally:
        server.stop()
    assert password not in (data_dir / "redis.log").read_text(errors="replace")


def _run_until_banner(
    data_dir: Path, env: dict[str, str], run: int
) -> tuple[subprocess.Popen[bytes], Path, Path, int]:
    ports = free_ports(len(PORT_FLAGS))
    flags = [arg for flag, port in zip(PORT_FLAGS, ports, strict=True)
             for arg in (f"--{flag}-port", str(port))]  # fmt: skip
    out, err = data_dir / f"run-{run}.out", data_dir / f"run-{run}.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            [str(DEVSTACK), "run", "--data-dir", str(data_dir / ".parley"), *flags],
            cwd=data_dir,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )

    def banner() -> bool:
        return "A token for the API:" in out.read_text(errors="replace")

    with contextlib.suppress(DevstackError):  # a timeout: the check below fails the test
        wait_until(lambda: banner() or process.poll() is not None, timeout=90, what="the banner")
    if not banner():
        process.kill()
        process.wait()
        pytest.fail(f"no banner:\n{out.read_text()}\n{err.read_text()}")
    return process, out, err, ports[1]


def test_make_run_keeps_one_redis_password_and_never_prints_it(
    data_dir: Path, clean_env: dict[str, str], empty_database: str
) -> None:
    # An empty private database (parley.testing's plugin): the stack migrates it.
    env = {**clean_env, "PARLEY_DATABASE_URL": empty_database}
    passwords = []
    for run in range(2):
        process, out, err, redis_port = _run_until_banner(data_dir, env, run)
        try:
            password_file = data_dir / ".parley" / REDIS_PASSWORD_FILE_NAME
            config = data_dir / ".parley" / "redis" / CONFIG_FILE_NAME
            assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(config.stat().st_mode) == 0o600
            password = password_file.read_text().strip()
            assert len(password) >= 32
            passwords.append(password)
            # The services reached SERVING through this Redis (the banner comes after), and the
            # banner names it without the password.
            assert f"  Redis          redis://:***@127.0.0.1:{redis_port}/0" in (
                out.read_text().splitlines()
            )
            processes = _redis_processes(redis_port)
            assert len(processes) == 1 and not _shows(processes[0], password)
            with redis.Redis(port=redis_port, socket_timeout=5) as anonymous:
                with pytest.raises(redis.AuthenticationError):
                    anonymous.ping()
            with redis.Redis(port=redis_port, password=password, socket_timeout=5) as client:
                assert client.ping()
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(60) == 0
        printed = out.read_text(errors="replace") + err.read_text(errors="replace")
        assert "stopping Redis" in printed
        assert password not in printed
        logs = data_dir / ".parley" / "logs"
        for log in logs.iterdir():
            assert password not in log.read_text(errors="replace"), log
    assert passwords[0] == passwords[1], "the password is made once and kept"
