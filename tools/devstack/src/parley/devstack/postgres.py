"""An embedded Postgres: initdb on first use, then `postgres` in the foreground on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from parley.devstack.binaries import postgres_bin_dir
from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.processes import (
    Process,
    make_traversable,
    unprivileged_user,
    wait_until,
)

__all__ = ["SUPERUSER", "EmbeddedPostgres"]

_log = logging.getLogger("parley.devstack")

SUPERUSER = "postgres"


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, serving on 127.0.0.1:`port` with trust auth.

    `durable=False` turns off fsync: much faster, and fine for throwaway clusters.
    """

    def __init__(self, data_dir: Path, port: int, *, log_path: Path, durable: bool = True) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.log_path = log_path.absolute()
        self.durable = durable
        self._bin_dir = postgres_bin_dir()
        self._run_as = unprivileged_user()
        self._socket_dir: Path | None = None
        self._process: Process | None = None

    @property
    def process(self) -> Process | None:
        return self._process

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def start(self, *, timeout: float = 60.0, databases: tuple[str, ...] = ()) -> None:
        """Initialize the cluster if needed, start it, wait until it accepts connections."""
        self._prepare_directories()
        if not self.initialized:
            self._initdb(timeout)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self._give_away(self._socket_dir)
        command = [
            str(self._bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-h", LOOPBACK,
            "-k", str(self._socket_dir),
        ]  # fmt: skip
        if not self.durable:
            command += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
        with self.log_path.open("ab") as log:
            self._process = Process(
                "postgres",
                command,
                env=self._env(),
                cwd=self.data_dir,
                output=log,
                run_as=self._run_as,
            )
        try:
            wait_until(
                self._accepts_connections,
                timeout=timeout,
                what=f"Postgres on {LOOPBACK}:{self.port}",
                watch=[self._process],
            )
        except DevstackError as exc:
            self.stop()
            raise DevstackError(f"{exc}\n{tail(self.log_path)}") from None
        for database in databases:
            self.create_database(database)

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: roll back open transactions, disconnect clients, checkpoint, exit."""
        if self._process is not None:
            self._process.stop(signal.SIGINT, timeout, escalate=[(signal.SIGQUIT, 5.0)])
            self._process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _prepare_directories(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._run_as is None:
            return
        for directory in make_traversable(self.data_dir):
            _log.info(
                "allowed other users to search %s, so that Postgres (running as %s) reaches %s",
                directory,
                self._run_as.name,
                self.data_dir,
            )
        if self.data_dir.stat().st_uid != self._run_as.uid:
            self._give_away(self.data_dir, recursive=True)

    def _give_away(self, path: Path, *, recursive: bool = False) -> None:
        """Hand `path` to the user Postgres runs as (a no-op unless we are root)."""
        if self._run_as is None:
            return
        uid, gid = self._run_as.uid, self._run_as.gid
        os.chown(path, uid, gid)
        if recursive:
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def _initdb(self, timeout: float) -> None:
        command = [
            str(self._bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "--username", SUPERUSER,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            command.append("--no-sync")
        with self.log_path.open("ab") as log:
            initdb = Process(
                "initdb",
                command,
                env=self._env(),
                cwd=self.data_dir,
                output=log,
                run_as=self._run_as,
            )
        if not initdb.wait(timeout):
            initdb.stop()
            raise DevstackError(f"initdb did not finish within {timeout:g}s")
        if initdb.returncode != 0:
            raise DevstackError(
                f"initdb failed with {initdb.describe_exit()}\n{tail(self.log_path)}"
            )
