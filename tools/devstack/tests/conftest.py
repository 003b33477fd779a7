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
    """A fresh directory directly under the system temp dir.

    Not pytest's tmp_path: when the tests run as root, Postgres runs as another user that must
    be able to reach the directory, and pytest's base temp dir is private to the current user.
    """
    path = Path(tempfile.mkdtemp(prefix="parley-devstack-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The current environment without any PARLEY_* variable, so nothing outside leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
