"""The Dockerfiles pass hadolint and build images the way Parley needs them: multi-stage with
uv, dependencies in their own layer, a final stage with only the virtualenv, a non-root user,
SIGTERM as the stop signal, an exec-form entrypoint and a pinned base image."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", ".tools", "node_modules", ".parley"}
SERVICE_DOCKERFILES = sorted(REPO.glob("services/*/Dockerfile"))
# What a final stage may contain: no RUN, so nothing is installed and no build tool lands.
FINAL_STAGE_INSTRUCTIONS = {
    "FROM", "ARG", "COPY", "ENV", "USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD",
    "WORKDIR", "LABEL",
}  # fmt: skip


def _dockerfiles() -> list[Path]:
    return sorted(
        path
        for path in REPO.rglob("*Dockerfile*")
        if path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts)
    )


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing(deploy: Any) -> None:
    hadolint = deploy.venv_tool("hadolint")
    files = _dockerfiles()
    assert SERVICE_DOCKERFILES and set(SERVICE_DOCKERFILES) <= set(files)
    # Run from the repository root, where hadolint picks up .hadolint.yaml if there is one.
    result = subprocess.run(
        [hadolint, "--no-color", *(str(f.relative_to(REPO)) for f in files)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(params=SERVICE_DOCKERFILES, ids=lambda p: p.parent.name)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_base_image_is_pinned_and_shared_by_every_stage(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    args = [rest for word, rest in instructions if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(args) == 1, "one ARG BASE_IMAGE=<image> (image checks pass their own base)"
    default = args[0].split("=", 1)[1]
    assert re.search(r":\d+\.\d+\.\d+[-\w.]*$|@sha256:[0-9a-f]{64}$", default), (
        f"the default base image {default} is not pinned to a full version or digest"
    )
    stages = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a final stage"
    # The virtualenv links to the base image's interpreter: every stage must use the same one.
    assert set(stages) == {"${BASE_IMAGE}"}


def test_dependencies_are_installed_by_uv_before_the_sources_are_copied(
    dockerfile: Path,
) -> None:
    instructions = _instructions(dockerfile)
    syncs = [i for i, (w, rest) in enumerate(instructions) if w == "RUN" and "uv sync" in rest]
    assert len(syncs) == 2, "one sync for the dependencies, one for the workspace packages"
    for index in syncs:
        assert "--locked" in instructions[index][1] and "--no-dev" in instructions[index][1]
    assert "--no-install-workspace" in instructions[syncs[0]][1]
    assert "--no-editable" in instructions[syncs[1]][1]
    copies = [(i, rest) for i, (w, rest) in enumerate(instructions) if w == "COPY"]
    sources = [i for i, rest in copies if re.match(r"(libs|services|tools)\s", rest)]
    assert sources and syncs[0] < min(sources) < syncs[1], "sources copied between the syncs"

    # uv sync --locked needs the lock and every workspace member's pyproject.toml.
    before = " ".join(rest for i, rest in copies if i < syncs[0])
    members = [p.relative_to(REPO).as_posix() for p in REPO.glob("*/*/pyproject.toml")]
    for needed in ["uv.lock", "pyproject.toml", *members]:
        directory, _, name = needed.rpartition("/")
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", before) or (
            directory and re.search(rf"{re.escape(name)}\s+{re.escape(directory)}/", before)
        ), f"{needed} is not copied before the dependency layer"


def test_uv_in_the_image_is_the_makefiles_uv(dockerfile: Path) -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    assert match
    assert f"uv=={match.group(1)}" in dockerfile.read_text(encoding="utf-8")


def test_final_stage_has_only_the_virtualenv_and_runs_as_non_root(
    deploy: Any, dockerfile: Path
) -> None:
    stage = deploy.dockerfile_final_stage(dockerfile)
    extra = {word for word, _ in stage} - FINAL_STAGE_INSTRUCTIONS
    assert not extra, f"the final stage runs {sorted(extra)}"
    copies = [rest for word, rest in stage if word == "COPY"]
    assert copies and all(re.fullmatch(r"--from=\S+ /app/\.venv /app/\.venv", c) for c in copies)
    last = dict(stage)
    uid = last["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {last['USER']} is not a numeric non-root id"
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert deploy.exec_form(last["ENTRYPOINT"]), "ENTRYPOINT must be exec form (a JSON array)"
    assert deploy.exec_form(last["CMD"]), "CMD must be exec form (a JSON array)"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".git", ".venv", ".tools", ".parley", ".env", "**/__pycache__"} - patterns
    assert not missing, f".dockerignore lacks {sorted(missing)}"
