"""The Dockerfile passes hadolint and builds images the way Parley needs them: one file for
both services (`--build-arg SERVICE=user|chat`), multi-stage with uv, dependencies in their
own layer, only the service's own workspace members as sources, a final stage with only the
virtualenv, a non-root user, SIGTERM as the stop signal, an exec-form entrypoint and a pinned
base image."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from .dockerfile import (
    DOCKERFILE,
    dockerfile_instructions,
    dockerfile_stages,
    exec_form,
    image_config,
    image_services,
    service_image,
)
from .tools import REPO, venv_tool

SKIP_DIRS = {".git", ".venv", ".tools", "node_modules", ".parley"}
# What a final stage may contain: no RUN, so nothing is installed and no build tool lands.
FINAL_STAGE_INSTRUCTIONS = {
    "FROM", "ARG", "COPY", "ENV", "USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD",
    "WORKDIR", "LABEL",
}  # fmt: skip
# The images, one per value of the Dockerfile's SERVICE.
SERVICES = ["user", "chat"]


def _dockerfiles() -> list[Path]:
    return sorted(
        path
        for path in REPO.rglob("*Dockerfile*")
        if path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts)
    )


def test_hadolint_finds_nothing() -> None:
    hadolint = venv_tool("hadolint")
    files = _dockerfiles()
    assert DOCKERFILE in files
    # Run from the repository root, where hadolint picks up .hadolint.yaml if there is one.
    result = subprocess.run(
        [hadolint, "--no-color", *(str(f.relative_to(REPO)) for f in files)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_dockerfile_builds_every_service_image() -> None:
    # No Dockerfile per service: their copies differed only in names and ports.
    assert not list(REPO.glob("services/*/Dockerfile")), "the root Dockerfile builds them all"
    assert sorted(image_services()) == sorted(SERVICES)
    instructions = dockerfile_instructions(DOCKERFILE)
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    global_args = [rest for word, rest in instructions[:first_from] if word == "ARG"]
    assert "SERVICE" in global_args, "SERVICE has no default: every build names its service"
    # The last stage is the service's own, chosen by the argument.
    assert instructions[-1] == ("FROM", "service-${SERVICE}")
    for service in SERVICES:
        # services/<name> is the member, and its command the entrypoint.
        (script,) = _pyproject(f"services/{service}")["project"]["scripts"]
        assert script == f"parley-{service}"


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _build_stage(service: str) -> Any:
    (stage,) = [
        s for s in dockerfile_stages(DOCKERFILE, SERVICE=service)
        if any(w == "RUN" and "uv sync" in rest for w, rest in s.instructions)
    ]  # fmt: skip
    return stage


def test_base_image_is_pinned_and_shared_by_every_stage(service: str) -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    args = [rest for word, rest in instructions if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(args) == 1, "one ARG BASE_IMAGE=<image> (image checks pass their own base)"
    default = args[0].split("=", 1)[1]
    assert re.search(r":\d+\.\d+\.\d+[-\w.]*$|@sha256:[0-9a-f]{64}$", default), (
        f"the default base image {default} is not pinned to a full version or digest"
    )
    froms = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert froms.count("${BASE_IMAGE}") >= 2, "multi-stage: a build stage and a final stage"
    # The virtualenv links to the base image's interpreter: every stage must use the same one,
    # directly or through another stage of the file.
    base = "localhost/any-base:1"
    stages = dockerfile_stages(DOCKERFILE, SERVICE=service, BASE_IMAGE=base)
    names = {stage.name: stage for stage in stages if stage.name}
    for stage in stages:
        root = stage
        while root.base in names:
            root = names[root.base]
        assert root.base == base, f"stage {stage.name} is not built on BASE_IMAGE"
    assert _build_stage(service).base == default
    assert service_image(service)[0].base == default


def test_dependencies_are_installed_by_uv_before_the_sources_are_copied(service: str) -> None:
    instructions = list(_build_stage(service).instructions)
    syncs = [i for i, (w, rest) in enumerate(instructions) if w == "RUN" and "uv sync" in rest]
    assert len(syncs) == 2, "one sync for the dependencies, one for the workspace packages"
    for index in syncs:
        sync = instructions[index][1]
        assert "--locked" in sync and "--no-dev" in sync
        assert re.search(rf"--package \"?parley-{service}\b", sync), sync
    assert "--no-install-workspace" in instructions[syncs[0]][1]
    assert "--no-editable" in instructions[syncs[1]][1]
    copies = [(i, rest) for i, (w, rest) in enumerate(instructions) if w == "COPY"]
    sources = [i for i, rest in copies if not rest.split()[0].endswith(("pyproject.toml", ".lock"))]
    assert sources and syncs[0] < min(sources) and max(sources) < syncs[1], (
        "sources copied between the syncs"
    )

    # uv sync --locked needs the lock and every workspace member's pyproject.toml.
    before = " ".join(rest for i, rest in copies if i < syncs[0])
    for needed in ["uv.lock", "pyproject.toml", *_members()]:
        directory, _, name = needed.rpartition("/")
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", before) or (
            directory and re.search(rf"{re.escape(name)}\s+{re.escape(directory)}/", before)
        ), f"{needed} is not copied before the dependency layer"


def test_uv_in_the_image_is_the_makefiles_uv() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    assert match
    assert f"uv=={match.group(1)}" in DOCKERFILE.read_text(encoding="utf-8")


def test_final_stage_has_only_the_virtualenv_and_runs_as_non_root(service: str) -> None:
    image = service_image(service)
    words = {word for stage in image for word, _ in stage.instructions}
    extra = words - FINAL_STAGE_INSTRUCTIONS
    assert not extra, f"the final stage runs {sorted(extra)}"
    copies = [rest for stage in image for word, rest in stage.instructions if word == "COPY"]
    assert copies and all(re.fullmatch(r"--from=\S+ /app/\.venv /app/\.venv", c) for c in copies)
    config = image_config(image)
    uid = config["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {config['USER']} is not a numeric non-root id"
    assert config["STOPSIGNAL"] == "SIGTERM"
    assert exec_form(config["ENTRYPOINT"]) == [f"parley-{service}"], (
        "ENTRYPOINT must be exec form (a JSON array) and run the service's command"
    )
    assert exec_form(config["CMD"]), "CMD must be exec form (a JSON array)"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".git", ".venv", ".tools", ".parley", ".env", "**/__pycache__"} - patterns
    assert not missing, f".dockerignore lacks {sorted(missing)}"


# --- What each image's build copies from the context ----------------------------------------


@cache
def _pyproject(member: str) -> dict[str, Any]:
    text = (REPO / member / "pyproject.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _members() -> list[str]:
    """Every workspace member's pyproject.toml (the root's `members` globs)."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["uv"]
    return sorted(
        path.relative_to(REPO).as_posix()
        for pattern in globs["workspace"]["members"]
        for path in REPO.glob(f"{pattern}/pyproject.toml")
    )


def _own_members(service: str) -> set[str]:
    """services/<service> and the workspace members it depends on, directly or not."""
    folders = {
        _pyproject(m.removesuffix("/pyproject.toml"))["project"]["name"]: m for m in _members()
    }
    found: set[str] = set()
    todo = [f"parley-{service}"]
    while todo:
        folder = folders[todo.pop()].removesuffix("/pyproject.toml")
        if folder not in found:
            found.add(folder)
            sources = _pyproject(folder).get("tool", {}).get("uv", {}).get("sources", {})
            todo += [name for name, source in sources.items() if source.get("workspace")]
    return found


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match, plus ** for any number of folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            char = pattern[i]
            out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out, as Docker decides:
    a pattern matches the path or a folder above it, the last matching pattern wins, and a
    pattern starting with ! takes a path back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _pattern(raw.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def _dockerignore(context: Path) -> list[str]:
    lines = (context / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _copied(context: Path, service: str) -> dict[str, str]:
    """What the build for SERVICE=<service> copies from `context`: for every file, its path
    in the context -> the sha256 of its place in the image, its content and its mode."""
    patterns = _dockerignore(context)
    copied = {}
    dockerfile = context / "Dockerfile"
    for stage in dockerfile_stages(dockerfile, SERVICE=service):
        for word, rest in stage.instructions:
            if word != "COPY" or rest.startswith("--from="):
                continue
            assert not rest.startswith(("--", "[")), f"COPY {rest}: only plain COPY is read here"
            *sources, destination = rest.split()
            for source in sources:
                top = context / source
                assert top.exists(), f"COPY {source}: not in the context"
                files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
                for file in files:
                    path = file.relative_to(context).as_posix()
                    if _ignored(path, patterns):
                        continue
                    inside = file.relative_to(top).as_posix() if top.is_dir() else file.name
                    target = f"{destination.rstrip('/')}/{inside}"
                    digest = hashlib.sha256(target.encode() + b"\0" + file.read_bytes())
                    digest.update(oct(file.stat().st_mode & 0o777).encode())
                    copied[path] = digest.hexdigest()
    return copied


def test_each_image_copies_only_its_own_workspace_members(service: str) -> None:
    copied = set(_copied(REPO, service))
    own = _own_members(service)
    assert own == {"libs/proto", "libs/chassis", f"services/{service}"}, own
    # The lock, the pyproject.toml files uv sync --locked reads, and the sources of its own
    # members: nothing of the SDK, the tools, the test helpers or the other service.
    lock_inputs = {"uv.lock", "pyproject.toml", *_members()}
    strays = sorted(p for p in copied - lock_inputs if not any(p.startswith(f"{m}/") for m in own))
    assert not strays, f"the {service} image copies files of other members: {strays[:10]}"
    patterns = _dockerignore(REPO)
    for member in own:
        files = {p.relative_to(REPO).as_posix() for p in (REPO / member).rglob("*") if p.is_file()}
        missing = {p for p in files if not _ignored(p, patterns)} - copied
        assert not missing, f"{member} is not copied whole: {sorted(missing)[:10]}"
    assert lock_inputs <= copied


def _change(member: Path, mark: str) -> None:
    """One source file of a member changed, and one added."""
    existing = sorted((member / "src").rglob("*.py"))[0]
    existing.write_text(existing.read_text(encoding="utf-8") + f"\n# changed: {mark}\n")
    (existing.parent / f"added_{mark}.py").write_text('"""A new module."""\n', encoding="utf-8")


def test_a_change_outside_its_members_leaves_what_an_image_copies_unchanged(
    service: str, tmp_path: Path
) -> None:
    """Neither the SDK nor the other service's code is part of an image, so a change to them
    rebuilds no layer (`make image-check` shows the same with real podman builds). Their
    pyproject.toml files are the exception: uv sync --locked reads every member's."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "uv.lock", "pyproject.toml"):
        shutil.copy2(REPO / name, context / name)
    skip = shutil.ignore_patterns("__pycache__", "node_modules", ".pytest_cache")
    for folder in ("libs", "services", "tools"):
        shutil.copytree(REPO / folder, context / folder, ignore=skip)
    before = _copied(context, service)

    other = next(s for s in SERVICES if s != service)
    outside = [
        context / "services" / "api-client", context / "services" / other,
        context / "tools" / "devstack", context / "tools" / "bench", context / "libs" / "testing",
    ]  # fmt: skip
    for member in outside:
        _change(member, "outside")
    # Tests: the repository's and the service's own (.dockerignore keeps both out).
    for tests in (context / "tests", context / "services" / service / "tests"):
        tests.mkdir(exist_ok=True)
        (tests / "test_added.py").write_text("def test_added() -> None: ...\n", encoding="utf-8")
    after = _copied(context, service)
    assert after == before, (
        f"a change to {', '.join(p.relative_to(context).as_posix() for p in outside)} or a "
        f"test changed what the {service} image copies: "
        f"{sorted(set(after.items()) ^ set(before.items()))[:10]}"
    )

    # The control: a change to its own members does change it.
    for own in ("libs/chassis", f"services/{service}"):
        _change(context / own, "own")
        changed = _copied(context, service)
        assert changed != after, f"a change to {own} went unseen"
        after = changed
