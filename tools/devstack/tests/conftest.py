"""Dev stack test fixtures: private data directories and an environment without PARLEY_*."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh directory (mode 0700) directly under the system temp dir.

    Not pytest's tmp_path: pytest runs of other checkouts prune old basetemp directories, while
    servers of these tests may still be using theirs.
    """
    path = Path(tempfile.mkdtemp(prefix="parley-devstack-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The current environment without any PARLEY_* variable, so nothing outside leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
