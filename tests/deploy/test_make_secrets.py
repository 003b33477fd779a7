"""`make secrets` (scripts/make_secrets.py), run for real in a directory of the test's own:
it makes .env from .env.example, fills in only the missing or empty secrets with random
URL-safe values that the services accept, keeps those already set unless FORCE=1, and leaves
.env readable by its owner only."""

from __future__ import annotations

import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from parley.chassis import AuthSettings, DatabaseSettings, Env
from parley.chassis.sample_secrets import is_sample_secret

from .tools import REPO

SCRIPT = REPO / "scripts" / "make_secrets.py"
SECRETS = ("PARLEY_JWT_SECRET", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
URL_SAFE = re.compile(r"[A-Za-z0-9_-]{43,}")  # 32 random bytes or more, base64url


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with the Makefile's view of the repository: the script and .env.example."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / SCRIPT.name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env.example")
    return tmp_path


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`make secrets` of the repository's Makefile, run in `project`."""
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "secrets", *args],
        cwd=project, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def values(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name] = value
    return found


def test_it_makes_env_from_the_example_with_fresh_secrets(project: Path) -> None:
    result = make(project)
    assert result.returncode == 0, result.stderr
    env = project / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    example = (project / ".env.example").read_text(encoding="utf-8").splitlines()
    written = env.read_text(encoding="utf-8").splitlines()
    # Comments and other settings as in the example; only the secrets' empty values filled.
    assert len(written) == len(example)
    for before, after in zip(example, written, strict=True):
        name = before.partition("=")[0]
        if name in SECRETS:
            assert before == f"{name}=" and after.startswith(before)
        else:
            assert after == before
    found = values(env)
    made = [found[name] for name in SECRETS]
    assert all(URL_SAFE.fullmatch(value) for value in made), made
    assert len(set(made)) == 3
    assert len(found["PARLEY_JWT_SECRET"]) >= 64  # 48 random bytes
    for name in SECRETS:
        assert f"wrote {name} with a new random value" in result.stdout
    # The services take them: no sample secret, long enough, no URL encoding needed.
    assert not any(is_sample_secret(value) for value in made)
    AuthSettings.from_env(Env({"PARLEY_JWT_SECRET": found["PARLEY_JWT_SECRET"]}))
    url = f"postgresql://parley:{found['POSTGRES_PASSWORD']}@postgres:5432/parley"
    assert DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url})).url == url


def test_secrets_already_set_are_kept_and_missing_or_empty_ones_filled(project: Path) -> None:
    env = project / ".env"
    mine = secrets.token_urlsafe(12)
    env.write_text(
        f"# mine\nPOSTGRES_PASSWORD={mine}\nREDIS_PASSWORD=\nPOSTGRES_USER=me\n",
        encoding="utf-8",
    )
    env.chmod(0o644)
    result = make(project)
    assert result.returncode == 0, result.stderr
    found = values(env)
    assert found["POSTGRES_PASSWORD"] == mine
    assert found["POSTGRES_USER"] == "me"
    assert URL_SAFE.fullmatch(found["REDIS_PASSWORD"])
    assert URL_SAFE.fullmatch(found["PARLEY_JWT_SECRET"])
    assert "kept POSTGRES_PASSWORD, which is set (FORCE=1 replaces it)" in result.stdout
    assert stat.S_IMODE(env.stat().st_mode) == 0o600

    # Run again: nothing changes.
    before = env.read_text(encoding="utf-8")
    again = make(project)
    assert again.returncode == 0, again.stderr
    assert env.read_text(encoding="utf-8") == before
    assert again.stdout.count("kept ") == 3


def test_force_replaces_every_secret(project: Path) -> None:
    assert make(project).returncode == 0
    before = values(project / ".env")
    result = make(project, "FORCE=1")
    assert result.returncode == 0, result.stderr
    after = values(project / ".env")
    for name in SECRETS:
        assert URL_SAFE.fullmatch(after[name]) and after[name] != before[name]
        assert f"replaced {name}" in result.stdout
    assert "docker compose down -v" in result.stderr  # Postgres keeps the old one
    assert {k: v for k, v in after.items() if k not in SECRETS} == {
        k: v for k, v in before.items() if k not in SECRETS
    }


def test_it_needs_only_the_standard_library(tmp_path: Path) -> None:
    # -I -S: no site-packages, no PYTHONPATH, no user site.
    env = tmp_path / "elsewhere.env"
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--env", str(env), "--example",
         str(tmp_path / "no-such.example")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(values(env)) == set(SECRETS)


def test_make_help_lists_the_target() -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert re.search(r"^\s+secrets\s+\S", result.stdout, re.MULTILINE), result.stdout
