"""A start of the embedded Postgres removes the run directories (socket, mirrored installation)
that an earlier run left behind when it was killed without cleaning up, and nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from parley.devstack.postgres import remove_abandoned_run_dirs


@pytest.fixture
def made() -> Iterator[list[Path]]:
    paths: list[Path] = []
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _run_dir(made: list[Path], owner: int | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    made.append(path)
    (path / "install").mkdir()
    (path / "install" / "postgres").write_bytes(b"\x7fELF")
    if owner is not None:
        (path / "owner.pid").write_text(f"{owner}\n")
    return path


def test_only_directories_of_dead_makers_go(made: list[Path]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    abandoned = _run_dir(made, int(dead.stdout))
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE) as living:  # fmt: skip
        in_use = _run_dir(made, living.pid)
        unmarked = _run_dir(made, None)
        mine = _run_dir(made, os.getpid())
        # Its maker is gone, but the Postgres it started still runs.
        orphaned_server = _run_dir(made, int(dead.stdout))
        with (orphaned_server / "owner.pid").open("a") as owner:
            owner.write(f"{living.pid}\n")

        removed = remove_abandoned_run_dirs()

        assert abandoned in removed and not abandoned.exists()
        kept = {in_use, unmarked, mine, orphaned_server}
        assert all(path.is_dir() for path in kept)
        assert not kept & set(removed)
        assert living.stdin is not None
        living.stdin.close()
