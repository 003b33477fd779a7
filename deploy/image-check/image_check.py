"""Build Parley's container images with podman and run them against local Postgres and Redis.

`make image-check` runs this with the workspace's environment. The steps:

1. install podman, runc and debootstrap from Debian's packages when they are missing (as root);
2. make a base image: debootstrap of Debian bookworm plus python3, imported with
   `podman import` and kept in podman's storage under a tag derived from its recipe, so a
   second run reuses it (`--base-image` uses an existing image instead, such as the official
   Python slim image where it can be pulled);
3. build the user and chat images from the one Dockerfile with `--build-arg SERVICE=...` and
   `--build-arg BASE_IMAGE=...`;
4. show that each image holds only its own workspace members: in a copy of the build context,
   a change to the SDK, the tools, the test helpers and the other service rebuilds no layer
   of it (the same image ID, every step a cache hit), while a change to its own service does;
5. check each image's configuration: a non-root user, SIGTERM as the stop signal, an
   exec-form entrypoint, and no compiler;
6. in a database of its own and under a Redis prefix of its own, run `parley-user migrate`
   and `parley-chat migrate`, start both services with their real command on free ports,
   wait for grpc.health.v1 (liveness and readiness), make real RPCs (CreateUser and GetUser;
   StreamChat and ListMessages), read /metrics, check the processes run as non-root, and stop
   each with `podman stop` (SIGTERM), which must end it with exit code 0 within its grace;
7. always remove the containers, the database and the Redis keys, print a summary, and exit
   non-zero when any check failed.

Podman runs here with `--runtime runc --cgroup-manager=cgroupfs` and explicit ulimits; see
deploy/image-check/README.md for why and for the measured times.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parley.proto.contract import CHAT_SERVICE, USER_SERVICE

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".tools" / "image-check"

# What podman needs on Parley's CI machines: crun cannot raise limits there and a systemd
# cgroup manager is not available, so runc with cgroupfs, and limits set explicitly.
# IMAGE_CHECK_PODMAN replaces the command and its global options (say, plain `podman`).
PODMAN = shlex.split(
    os.environ.get("IMAGE_CHECK_PODMAN", "podman --runtime runc --cgroup-manager=cgroupfs")
)
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
APT_PACKAGES = ["podman", "runc", "debootstrap"]
# How the Helm chart's securityContext and docker-compose.yml run the services: a read-only
# root file system with a tmpfs /tmp, no capabilities, no privilege escalation.
HARDENING = [
    "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
]  # fmt: skip

# The local base: Debian bookworm with the Python the Dockerfiles' build stage needs
# (python3 -m venv, so python3-venv) and the CA bundle for HTTPS.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
# Bump when the way the base is made changes, so a cached base is rebuilt.
BASE_RECIPE = "2"
BASE_REPOSITORY = "localhost/parley-base"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

COMPILERS = ["gcc", "cc", "c++", "g++", "clang", "make"]
HEALTH_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0
# PARLEY_SHUTDOWN_GRACE's default; `podman stop` sends SIGKILL after this many seconds.
STOP_GRACE = 10


# Both images come from this Dockerfile (relative to the build context, the repository root);
# the build argument SERVICE names the image's service.
DOCKERFILE = "Dockerfile"


@dataclass(frozen=True)
class Image:
    name: str  # user or chat: the Dockerfile's SERVICE, and services/<name>
    tag: str
    grpc_service: str
    command: str  # the console script, also the entrypoint

    @property
    def build_args(self) -> list[str]:
        return ["--build-arg", f"SERVICE={self.name}"]


IMAGES = [
    Image("user", "localhost/parley-user:imagecheck", USER_SERVICE, "parley-user"),
    Image("chat", "localhost/parley-chat:imagecheck", CHAT_SERVICE, "parley-chat"),
]

# Build-context entries the cache check does not copy: what .dockerignore keeps out anyway,
# and the large local state (virtualenv, tools, the local stack's data).
CONTEXT_SKIP = [
    ".git", ".venv", ".tools", ".parley", "__pycache__", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".hypothesis", "node_modules",
]  # fmt: skip
# Workspace members neither image holds: a change to any of them must rebuild no layer.
NOT_IN_ANY_IMAGE = ["services/api-client", "tools/devstack", "tools/bench", "libs/testing"]


class Abort(Exception):
    """A step failed and the steps after it cannot run."""


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    title: str = "image-check"

    @contextlib.contextmanager
    def step(self, name: str, *, fatal: bool = True) -> Iterator[list[str]]:
        """Times a step; an exception in it fails the step, and aborts the run when fatal."""
        print(f"==> {name}", flush=True)
        detail: list[str] = []
        start = time.monotonic()
        try:
            yield detail
        except Exception as error:  # noqa: BLE001 - every failure is reported, then judged
            seconds = time.monotonic() - start
            message = str(error).strip() or type(error).__name__
            self.results.append(Result(name, False, seconds, message))
            print(f"    FAIL ({seconds:.1f}s): {message}", flush=True)
            if fatal:
                raise Abort(name) from error
        else:
            seconds = time.monotonic() - start
            text = "; ".join(detail)
            self.results.append(Result(name, True, seconds, text))
            print(f"    ok ({seconds:.1f}s){': ' + text if text else ''}", flush=True)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def print_summary(self, total: float) -> None:
        print(f"\n{self.title} summary")
        width = max((len(r.name) for r in self.results), default=10)
        for r in self.results:
            status = "PASS" if r.ok else "FAIL"
            line = f"  {status}  {r.name:<{width}}  {r.seconds:6.1f}s"
            print(f"{line}  {r.detail}" if r.detail else line)
        for note in self.notes:
            print(f"  {note}")
        verdict = "passed" if self.ok else "FAILED"
        print(f"{self.title} {verdict} in {total:.0f}s")


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    """Runs a command; on failure raises with the command and the end of its output."""
    result = subprocess.run(
        list(args),
        check=False,
        text=True,
        stdin=stdin,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        tail = "\n".join(((result.stderr or "") + (result.stdout or "")).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`{shlex.join(args)}` exited {result.returncode}" + (f":\n{tail}" if tail else "")
        )
    return result


def podman(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run([*PODMAN, *args], **kwargs)


# -- tools ---------------------------------------------------------------------------------


def ensure_tools(need_debootstrap: bool) -> list[str]:
    wanted = APT_PACKAGES if need_debootstrap else [p for p in APT_PACKAGES if p != "debootstrap"]
    missing = [p for p in wanted if shutil.which(p, path=os.environ["PATH"] + ":/usr/sbin") is None]
    if not missing:
        return [f"found {', '.join(wanted)}"]
    apt_install(APT_PACKAGES, missing)
    return [f"installed {', '.join(APT_PACKAGES)}"]


def apt_install(packages: Sequence[str], missing: Sequence[str]) -> None:
    """Installs `packages` with apt-get (as root), because `missing` of them are missing."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            f"missing {', '.join(missing)}: install them (Debian: "
            f"`sudo apt-get install {' '.join(packages)}`) and run again"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=600", "-o", "Acquire::Retries=3"]
    for command in (
        [*apt, "update"],
        [*apt, "install", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(command, env=env, text=True, capture_output=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"`{shlex.join(command)}` exited {result.returncode}:\n{tail}")


# -- the local base image ------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 or one-line sources), else the default."""
    if os.environ.get("IMAGE_CHECK_MIRROR"):
        return os.environ["IMAGE_CHECK_MIRROR"]
    sources = Path("/etc/apt/sources.list.d")
    files = sorted(sources.glob("*.sources")) if sources.is_dir() else []
    for path in files:
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[key.strip().lower()] = value.strip()
            suites = fields.get("suites", "").split()
            if "enabled" in fields and fields["enabled"].lower() == "no":
                continue
            if BASE_SUITE in suites and "main" in fields.get("components", "").split():
                return fields.get("uris", DEFAULT_MIRROR).split()[0]
    lists = [Path("/etc/apt/sources.list")]
    if sources.is_dir():
        lists += sorted(sources.glob("*.list"))
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"]:
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 3 and words[1] == BASE_SUITE and "main" in words[2:]:
                    return words[0]
    return DEFAULT_MIRROR


def base_tag() -> str:
    recipe = json.dumps(
        {"suite": BASE_SUITE, "packages": BASE_PACKAGES, "env": BASE_ENV, "recipe": BASE_RECIPE},
        sort_keys=True,
    )
    return f"{BASE_REPOSITORY}:{BASE_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False, capture=True).returncode == 0


def make_base(detail: list[str]) -> str:
    tag = base_tag()
    WORK.mkdir(parents=True, exist_ok=True)
    # Two runs at once would both debootstrap; the second waits and then reuses the first's.
    with open(WORK / "base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(tag):
            detail.append(f"cached {tag}")
            return tag
        if os.geteuid() != 0:
            raise RuntimeError("debootstrap needs root; or pass --base-image IMAGE")
        mirror = debian_mirror()
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=WORK) as rootfs:
            started = time.monotonic()
            debootstrap = [
                "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE, rootfs, mirror,
            ]  # fmt: skip
            try:
                run(debootstrap, capture=True)
            except RuntimeError as error:
                # One retry: a dropped download from the mirror should not fail the check.
                print(f"    debootstrap failed, retrying once: {str(error).splitlines()[0]}")
                shutil.rmtree(rootfs)
                Path(rootfs).mkdir()
                run(debootstrap, capture=True)
            debootstrapped = time.monotonic() - started
            # What the official Debian images leave out too: downloaded packages and indexes.
            for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in Path(rootfs, folder).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            changes = [f"--change=ENV {key}={value}" for key, value in BASE_ENV.items()]
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                podman(
                    "import", *changes, "--change=CMD [\"python3\"]",
                    "--message", f"debootstrap {BASE_SUITE} + {' '.join(BASE_PACKAGES)}",
                    "-", tag, stdin=tar.stdout, capture=True,
                )  # fmt: skip
            finally:
                if tar.stdout is not None:
                    tar.stdout.close()
                tar.wait()
        detail.append(f"built {tag} from {mirror} (debootstrap {debootstrapped:.0f}s)")
        return tag


# -- images --------------------------------------------------------------------------------


def build_image(image: Image, base: str, detail: list[str], *, log_dir: Path = WORK) -> None:
    podman_build(image, base, ROOT, log_dir / f"build-{image.name}.log", "-t", image.tag)
    detail.append(f"{image.tag}, {image_size(image.tag)}")


def podman_build(image: Image, base: str, context: Path, log: Path, *extra: str) -> None:
    """`podman build` of `image` from `context`, its output in `log`."""
    args = [
        "build", "--network", "host", *ULIMITS, "--build-arg", f"BASE_IMAGE={base}",
        *image.build_args, "-f", str(context / DOCKERFILE), *extra,
    ]  # fmt: skip
    if HOST_CA_BUNDLE.is_file():
        # A TLS-intercepting proxy's CA, trusted by the host but not by a fresh base, for the
        # build steps that download from PyPI. Mounts are not stored in layers.
        args += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    with open(log, "w") as out:
        result = subprocess.run(
            [*PODMAN, *args, str(context)], stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-20:])
        raise RuntimeError(f"podman build exited {result.returncode} (log: {log}):\n{tail}")


@dataclass(frozen=True)
class Build:
    image_id: str
    steps: int  # the steps podman ran or took from its cache (FROM excluded)
    cached: int  # those taken from the cache
    created: list[str]  # the images of the steps podman ran, oldest first
    log: Path

    @property
    def all_cached(self) -> bool:
        return self.steps > 0 and self.cached == self.steps


def cache_build(image: Image, base: str, context: Path, log: Path) -> Build:
    """Builds `image` from `context` (untagged) and reads which steps were cache hits."""
    iidfile = log.with_suffix(".iid")
    podman_build(image, base, context, log, "--iidfile", str(iidfile))
    steps = cached = 0
    created: list[str] = []
    pending = False
    # podman prints "STEP n/m: INSTRUCTION ...", then "--> Using cache <id>" for a cache hit
    # or "--> <id>" for the image of a step it ran.
    for line in log.read_text().splitlines():
        step = re.match(r"(\[\d+/\d+\] )?STEP \d+/\d+: (\S+)", line)
        if step:
            pending = step.group(2).upper() != "FROM"
            steps += pending
        elif pending and line.startswith("--> "):
            if line.startswith("--> Using cache "):
                cached += 1
            else:
                created.append(line.split()[1])
            pending = False
    image_id = iidfile.read_text().strip().removeprefix("sha256:")[:12]
    return Build(image_id, steps, cached, created, log)


def change_member(context: Path, member: str, mark: str) -> None:
    """Edits a member's sources in the copied context: one file changed and one added."""
    folder = context / member
    existing = sorted((folder / "src").rglob("*.py"))
    if not existing:
        raise RuntimeError(f"{member} has no Python sources to change")
    with open(existing[0], "a") as source:
        source.write(f"\n# image-check: changed ({mark})\n")
    (existing[0].parent / f"image_check_{mark}.py").write_text('"""Added by image-check."""\n')


def check_build_cache(base: str, detail: list[str]) -> None:
    """Each image copies only its own members: changes elsewhere rebuild none of its layers."""
    user, chat = (next(i for i in IMAGES if i.name == name) for name in ("user", "chat"))
    # New in every run, so the control below can never be a cache hit of an earlier run.
    run_id = secrets.token_hex(4)
    builds: list[Build] = []
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix="context-", dir=WORK) as folder,
    ):
        cleanup.callback(remove_created, builds)
        context = Path(folder) / "parley"
        shutil.copytree(ROOT, context, symlinks=True, ignore=shutil.ignore_patterns(*CONTEXT_SKIP))

        def build(image: Image, label: str) -> Build:
            log = WORK / f"cache-{image.name}-{label}.log"
            builds.append(cache_build(image, base, context, log))
            return builds[-1]

        def unchanged(image: Image, before: Build, label: str, changed: str) -> Build:
            after = build(image, label)
            if after.image_id != before.image_id or not after.all_cached:
                raise RuntimeError(
                    f"a change to {changed} rebuilt the {image.name} image: "
                    f"{after.steps - after.cached} of {after.steps} steps not cached, "
                    f"image {before.image_id} -> {after.image_id} (log: {after.log})"
                )
            return after

        first = {image.name: build(image, "first") for image in (user, chat)}
        outside = ", ".join(NOT_IN_ANY_IMAGE)
        for member in NOT_IN_ANY_IMAGE:
            change_member(context, member, f"{run_id}a")
        change_member(context, "services/chat", f"{run_id}a")
        ran = unchanged(user, first["user"], "second", f"{outside} and services/chat")
        # The control: the chat image does see a change to its own service.
        control = build(chat, "second")
        if control.image_id == first["chat"].image_id or control.all_cached:
            raise RuntimeError(
                f"a change to services/chat left the chat image as it was (log: {control.log})"
            )
        for member in NOT_IN_ANY_IMAGE:
            change_member(context, member, f"{run_id}b")
        change_member(context, "services/user", f"{run_id}b")
        unchanged(chat, control, "third", f"{outside} and services/user")
    detail.append(
        f"user {ran.image_id} kept after changes to {outside} and services/chat "
        f"({ran.cached}/{ran.steps} steps cached); chat {control.image_id} kept after changes "
        f"to them and services/user; its own change rebuilt chat "
        f"({control.steps - control.cached} steps)"
    )


def remove_created(builds: list[Build]) -> None:
    """Removes the untagged images the cache check's builds made (newest first), so they do
    not pile up; a cache hit reused an image that was there before and is kept."""
    for image_id in reversed([i for b in builds for i in (*b.created, b.image_id) if b.created]):
        tags = podman(
            "image", "inspect", "--format", "{{len .RepoTags}}", image_id, check=False, capture=True
        )
        if tags.stdout.strip() == "0":  # never an image someone tagged
            podman("rmi", image_id, check=False, capture=True)


def image_size(tag: str) -> str:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout)
    return f"{size / 1e6:.0f} MB"


def check_config(image: Image, detail: list[str]) -> None:
    config = json.loads(podman("image", "inspect", image.tag, capture=True).stdout)[0]["Config"]
    user = str(config.get("User") or "")
    if user.split(":")[0] in ("", "0", "root"):
        raise RuntimeError(f"the image runs as root (User={user!r})")
    if config.get("StopSignal") != "SIGTERM":
        raise RuntimeError(f"StopSignal is {config.get('StopSignal')!r}, not SIGTERM")
    entrypoint = config.get("Entrypoint") or []
    if entrypoint != [image.command]:
        raise RuntimeError(f"entrypoint is {entrypoint!r}, expected exec form [{image.command!r}]")
    probe = "for c in " + " ".join(COMPILERS) + '; do command -v "$c"; done; true'
    found = podman(
        "run", "--rm", "--network", "none", *ULIMITS, "--entrypoint", "/bin/sh", image.tag,
        "-c", probe, capture=True,
    ).stdout.split()  # fmt: skip
    if found:
        raise RuntimeError(f"build tools in the final image: {', '.join(found)}")
    detail.append(f"User={user}, StopSignal=SIGTERM, ENTRYPOINT {entrypoint}, no compiler")


# -- the running check ---------------------------------------------------------------------


@dataclass
class Stack:
    run_id: str
    admin_url: str
    redis_url: str
    database: str
    redis_prefix: str
    secret: str
    ports: dict[str, int]
    containers: list[str] = field(default_factory=list)
    database_created: bool = False
    redis_used: bool = False

    def database_url(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.admin_url, dbname=self.database)

    def env(self, image: Image) -> list[str]:
        values = {
            "PARLEY_DATABASE_URL": self.database_url(),
            "PARLEY_JWT_SECRET": self.secret,
            "PARLEY_GRPC_HOST": "127.0.0.1",
            "PARLEY_GRPC_PORT": str(self.ports[image.name]),
            "PARLEY_METRICS_HOST": "127.0.0.1",
            "PARLEY_METRICS_PORT": str(self.ports[f"{image.name}-metrics"]),
            "PARLEY_SHUTDOWN_GRACE": f"{STOP_GRACE - 2}s",
            "PARLEY_LOG_FORMAT": "plain",
        }
        if image.name == "chat":
            values |= {
                "PARLEY_REDIS_URL": self.redis_url,
                "PARLEY_REDIS_PREFIX": self.redis_prefix,
                "PARLEY_USER_SERVICE_ADDR": f"127.0.0.1:{self.ports['user']}",
            }
        return [arg for key, value in values.items() for arg in ("-e", f"{key}={value}")]

    def container(self, image: Image, role: str) -> str:
        name = f"parley-imagecheck-{self.run_id}-{role}"
        self.containers.append(name)
        return name


def create_database(stack: Stack) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(stack.admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(stack.database)))
    stack.database_created = True


def drop_database(stack: Stack) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(stack.admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(stack.database)
            )
        )


def ping_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.ping()
    finally:
        client.close()


def delete_redis_keys(stack: Stack) -> int:
    import redis

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{stack.redis_prefix}*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def migrate(stack: Stack, image: Image, detail: list[str]) -> None:
    name = stack.container(image, f"migrate-{image.name}")
    result = podman(
        "run", "--name", name, "--network", "host", *ULIMITS, *HARDENING, *stack.env(image),
        image.tag, "migrate", capture=True, check=False, timeout=300,
    )  # fmt: skip
    output = (result.stderr + result.stdout).strip().splitlines()
    if result.returncode != 0:
        raise RuntimeError(
            f"`{image.command} migrate` exited {result.returncode}:\n" + "\n".join(output[-15:])
        )
    detail.append(output[-1].split(" [-] ", 1)[-1] if output else "done")


def start(stack: Stack, image: Image) -> str:
    name = stack.container(image, image.name)
    # No command: the image's own ENTRYPOINT and CMD (`serve`), as a deployment runs it.
    podman(
        "run", "-d", "--name", name, "--network", "host", *ULIMITS, *HARDENING,
        *stack.env(image), image.tag, capture=True,
    )  # fmt: skip
    return name


def container_state(name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        podman("inspect", "--format", "{{json .State}}", name, capture=True).stdout
    )
    return state


def logs(name: str, lines: int = 20) -> str:
    result = podman("logs", "--tail", str(lines), name, capture=True, check=False)
    return (result.stdout + result.stderr).strip()


def wait_healthy(stack: Stack, image: Image, container: str, detail: list[str]) -> None:
    """Waits, as `make run` waits for its services (parley.devstack), until the container's
    server reports liveness and its service SERVING; fails if the container exits first."""
    import grpc

    from parley.devstack.errors import DevstackError
    from parley.devstack.processes import wait_until
    from parley.devstack.services import grpc_serving

    address = f"127.0.0.1:{stack.ports[image.name]}"
    started = time.monotonic()

    def healthy(channel: grpc.Channel) -> bool:
        state = container_state(container)
        if not state.get("Running"):
            raise RuntimeError(
                f"the container exited ({state.get('ExitCode')}):\n{logs(container)}"
            )
        return all(grpc_serving(channel, service) for service in ("", image.grpc_service))

    with grpc.insecure_channel(address) as channel:
        try:
            wait_until(
                lambda: healthy(channel),
                timeout=HEALTH_TIMEOUT,
                what=f"liveness and {image.grpc_service} SERVING on {address}",
                interval=0.25,
            )
        except DevstackError as exc:
            raise RuntimeError(f"{exc}:\n{logs(container)}") from None
    detail.append(
        f"{address} liveness and {image.grpc_service} SERVING after "
        f"{time.monotonic() - started:.1f}s"
    )


def check_user_rpc(stack: Stack, detail: list[str]) -> int:
    import grpc

    from parley.client.tokens import mint_token
    from parley.proto import user_pb2, user_pb2_grpc

    token = mint_token(stack.secret, "image-check", ["users:write"], ttl=600)
    auth = (("authorization", f"Bearer {token}"),)
    email = f"image-check-{stack.run_id}@example.com"
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['user']}") as channel:
        stub = user_pb2_grpc.UserServiceStub(channel)
        created = stub.CreateUser(
            user_pb2.CreateUserRequest(name="Image Check", email=email, age=30),
            metadata=auth,
            timeout=CALL_TIMEOUT,
        )
        user_id = created.user.id
        fetched = stub.GetUser(
            user_pb2.GetUserRequest(id=user_id), metadata=auth, timeout=CALL_TIMEOUT
        ).user
    if (fetched.id, fetched.email, fetched.name) != (user_id, email, "Image Check"):
        raise RuntimeError(f"GetUser returned {fetched} for the user CreateUser made ({created})")
    detail.append(f"CreateUser made id {user_id}, GetUser returned it")
    return user_id


def check_chat_rpc(stack: Stack, user_id: int, detail: list[str]) -> None:
    import grpc

    from parley.client.tokens import mint_token
    from parley.proto import chat_pb2, chat_pb2_grpc
    from parley.proto.contract import ROOM_KEY

    token = mint_token(stack.secret, str(user_id), ttl=600)
    room = f"image-check-{stack.run_id}"
    text = f"hello from the image check {stack.run_id}"
    auth = (("authorization", f"Bearer {token}"),)
    outgoing: queue.Queue[chat_pb2.ChatMessage | None] = queue.Queue()

    def requests() -> Iterator[chat_pb2.ChatMessage]:
        while (message := outgoing.get()) is not None:
            yield message

    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['chat']}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.StreamChat(
            requests(), metadata=(*auth, (ROOM_KEY, room)), timeout=CALL_TIMEOUT * 3
        )
        outgoing.put(chat_pb2.ChatMessage(text=text, client_message_id=f"ic-{stack.run_id}"))
        echoed = None
        # The stream's deadline bounds this loop; the reader runs in its own thread so a
        # silent server fails the check instead of blocking it.
        received: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            try:
                for message in call:
                    received.put(message)
            except grpc.RpcError as error:
                received.put(error)
            else:
                received.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while echoed is None:
                try:
                    item = received.get(timeout=CALL_TIMEOUT * 3)
                except queue.Empty:
                    raise RuntimeError("StreamChat sent nothing back within 30s") from None
                if item is None:
                    raise RuntimeError("StreamChat ended without echoing the message sent")
                if isinstance(item, grpc.RpcError):
                    raise RuntimeError(f"StreamChat failed: {item.code().name}: {item.details()}")
                if item.text == text:
                    echoed = item
        finally:
            outgoing.put(None)
            call.cancel()
            reader.join(timeout=5)
        if (echoed.room, echoed.user_id, echoed.sequence) != (room, user_id, 1):
            raise RuntimeError(f"StreamChat echoed an unexpected message: {echoed}")
        page = stub.ListMessages(
            chat_pb2.ListMessagesRequest(room=room), metadata=auth, timeout=CALL_TIMEOUT
        )
    if [m.text for m in page.messages] != [text]:
        raise RuntimeError(f"ListMessages returned {list(page.messages)}, expected the one sent")
    detail.append(
        f"StreamChat echoed sequence 1 from {echoed.user!r}; ListMessages has it in {room}"
    )


def check_metrics(stack: Stack, image: Image, detail: list[str]) -> None:
    url = f"http://127.0.0.1:{stack.ports[f'{image.name}-metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as response:
        body = response.read().decode()
    if "grpc_server" not in body and "parley" not in body:
        raise RuntimeError(f"{url} answered, but with no gRPC or Parley metrics")
    detail.append(f"{url} {len(body.splitlines())} lines")


def check_non_root(container: str, detail: list[str]) -> None:
    uid = podman("exec", container, "id", "-u", capture=True).stdout.strip()
    pid1 = podman("exec", container, "cat", "/proc/1/status", capture=True).stdout
    pid1_uids = next(line.split()[1:] for line in pid1.splitlines() if line.startswith("Uid:"))
    if uid == "0" or "0" in pid1_uids:
        raise RuntimeError(f"runs as root (exec uid {uid}, PID 1 uids {pid1_uids})")
    detail.append(f"PID 1 and exec run as uid {uid}")


def check_stop(container: str, detail: list[str]) -> None:
    started = time.monotonic()
    podman("stop", "--time", str(STOP_GRACE), container, capture=True, timeout=STOP_GRACE + 60)
    seconds = time.monotonic() - started
    state = container_state(container)
    code = state.get("ExitCode")
    if code != 0:
        raise RuntimeError(
            f"exit code {code} after {seconds:.1f}s (137 means SIGTERM was not handled "
            f"within {STOP_GRACE}s and podman killed it):\n{logs(container)}"
        )
    detail.append(f"SIGTERM -> exit 0 in {seconds:.1f}s (grace {STOP_GRACE}s)")


def cleanup(stack: Stack, report: Report) -> None:
    """Removes what the run made; every part is tried even when another fails."""
    started = time.monotonic()
    problems, removed = [], []
    for name in reversed(stack.containers):
        result = podman("rm", "--force", "--time", "2", name, check=False, capture=True)
        if result.returncode != 0 and "no such container" not in result.stderr.lower():
            problems.append(f"podman rm {name}: {result.stderr.strip()}")
    removed.append(f"{len(stack.containers)} containers")
    if stack.database_created:
        try:
            drop_database(stack)
            removed.append(f"database {stack.database}")
        except Exception as error:  # noqa: BLE001
            problems.append(f"drop database {stack.database}: {error}")
    if stack.redis_used:
        try:
            removed.append(f"{delete_redis_keys(stack)} Redis keys")
        except Exception as error:  # noqa: BLE001
            problems.append(f"Redis keys {stack.redis_prefix}*: {error}")
    seconds = time.monotonic() - started
    if problems:
        report.results.append(Result("clean up", False, seconds, "; ".join(problems)))
    else:
        report.results.append(Result("clean up", True, seconds, ", ".join(removed)))


def check_running(report: Report, images: dict[str, Image]) -> None:
    from parley.devstack.ports import free_ports

    run_id = secrets.token_hex(4)
    ports = free_ports(4)
    stack = Stack(
        run_id=run_id,
        admin_url=os.environ.get(
            "PARLEY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        redis_url=os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        database=f"parley_imagecheck_{run_id}",
        redis_prefix=f"parley-imagecheck-{run_id}",
        secret=secrets.token_hex(32),
        ports=dict(zip(["user", "user-metrics", "chat", "chat-metrics"], ports, strict=True)),
    )
    user, chat = images["user"], images["chat"]
    try:
        with report.step("postgres and redis") as detail:
            ping_redis(stack.redis_url)
            stack.redis_used = True
            create_database(stack)
            detail.append(f"database {stack.database}, Redis prefix {stack.redis_prefix}")
        with report.step("migrate (parley-user migrate)") as detail:
            migrate(stack, user, detail)
        with report.step("migrate (parley-chat migrate)") as detail:
            migrate(stack, chat, detail)
        containers = {}
        for image in (user, chat):
            with report.step(f"{image.name}: start and health") as detail:
                containers[image.name] = start(stack, image)
                wait_healthy(stack, image, containers[image.name], detail)
        with report.step("user: CreateUser + GetUser") as detail:
            user_id = check_user_rpc(stack, detail)
        with report.step("chat: StreamChat + ListMessages", fatal=False) as detail:
            check_chat_rpc(stack, user_id, detail)
        for image in (user, chat):
            with report.step(f"{image.name}: /metrics", fatal=False) as detail:
                check_metrics(stack, image, detail)
            with report.step(f"{image.name}: runs as non-root", fatal=False) as detail:
                check_non_root(containers[image.name], detail)
        for image in (chat, user):
            with report.step(f"{image.name}: podman stop (SIGTERM)", fatal=False) as detail:
                check_stop(containers[image.name], detail)
    finally:
        cleanup(stack, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--base-image",
        help="use this base image (for example the official Python slim image, where it can "
        "be pulled) instead of making one with debootstrap",
    )
    args = parser.parse_args(argv)

    report = Report()
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    images = {image.name: image for image in IMAGES}
    try:
        with report.step("podman, runc, debootstrap") as detail:
            detail += ensure_tools(need_debootstrap=args.base_image is None)
        with report.step("base image") as detail:
            if args.base_image:
                base = args.base_image
                detail.append(f"given: {base}")
            else:
                base = make_base(detail)
        for image in IMAGES:
            with report.step(f"{image.name}: build") as detail:
                build_image(image, base, detail)
        with report.step("build cache: each image copies only its members", fatal=False) as detail:
            check_build_cache(base, detail)
        for image in IMAGES:
            with report.step(f"{image.name}: image configuration", fatal=False) as detail:
                check_config(image, detail)
        check_running(report, images)
    except Abort:
        pass
    except KeyboardInterrupt:
        report.results.append(Result("interrupted", False, 0.0))
    report.print_summary(time.monotonic() - started)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
