"""The SDK installs without the command line's dependencies, which come with the `cli` extra.

Both tests run the repository's pinned uv (`make sync` installs it into .tools/), without the
network when its cache holds what they need: one builds the wheel and reads its metadata, the
other installs parley-client alone from uv.lock into a new virtualenv and runs `parley` there.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
MEMBER = Path(__file__).resolve().parents[1]
CLI_EXTRA = {
    "typer",
    "rich",
    "prompt-toolkit",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-exporter-otlp-proto-http",
}
INSTALL_HINT = "pip install 'parley-client[cli]'"


def _uv() -> str:
    pinned = ROOT / ".tools" / "uv" / "bin" / "uv"
    found = str(pinned) if pinned.exists() else shutil.which("uv")
    if found is None:
        pytest.skip("no uv: `make sync` installs it into .tools/")
    return found


def _run_uv(*args: str, env: dict[str, str] | None = None) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    environ.update(UV_PYTHON_DOWNLOADS="never", **(env or {}))
    done = subprocess.run(
        [_uv(), *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_wheel_puts_the_cli_dependencies_under_the_cli_extra(tmp_path: Path) -> None:
    _run_uv("build", "--wheel", "--out-dir", str(tmp_path), str(MEMBER))
    (wheel,) = tmp_path.glob("parley_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        (entry_points_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_name).decode())

    assert metadata.get_all("Provides-Extra") == ["cli"]
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    plain = {canonicalize_name(r.name) for r in requirements if r.marker is None}
    assert {"grpcio", "parley-proto", "pyjwt", "opentelemetry-api"} <= plain
    assert not plain & CLI_EXTRA
    for requirement in requirements:
        marker = requirement.marker
        if canonicalize_name(requirement.name) in CLI_EXTRA:
            assert marker is not None, requirement
            assert marker.evaluate({"extra": "cli"}), requirement
            assert not marker.evaluate({"extra": ""}), requirement
    extra = {
        canonicalize_name(r.name)
        for r in requirements
        if r.marker is not None and r.marker.evaluate({"extra": "cli"})
    }
    assert extra == CLI_EXTRA
    assert entry_points["console_scripts"]["parley"] == "parley.client.cli:main"


_EXTRA_FOUND = """
import importlib.util, sys
import parley.client, parley.client.chat, parley.client.session, parley.client.users
extra = ("typer", "rich", "prompt_toolkit", "opentelemetry.sdk")
print(",".join(n for n in extra if importlib.util.find_spec(n)))
"""


def test_parley_without_the_cli_extra_says_how_to_install_it(tmp_path: Path) -> None:
    env = tmp_path / "sdk-only"
    # --frozen: uv.lock as it is, so a lock that still gives the SDK typer fails here too.
    _run_uv(
        "sync",
        "--frozen",
        "--no-dev",
        "--package",
        "parley-client",
        "--python",
        sys.executable,
        env={"UV_PROJECT_ENVIRONMENT": str(env)},
    )
    bin_dir = env / "bin"
    sdk = subprocess.run(
        [str(bin_dir / "python"), "-c", _EXTRA_FOUND],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == ""  # the SDK imports, and none of the extra is installed

    for command in (
        [str(bin_dir / "parley"), "users", "list"],
        [str(bin_dir / "python"), "-m", "parley.client.cli"],
    ):
        ran = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert ran.returncode == 1, ran
        assert ran.stdout == ""
        (line,) = ran.stderr.splitlines()
        assert line.startswith("parley: error: ") and INSTALL_HINT in line, line
