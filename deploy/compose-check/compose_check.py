"""Run docker-compose.yml itself with podman and podman-compose, and the e2e suite against it.

`make compose-check` runs this with the workspace's environment. The steps:

1. install podman, runc, debootstrap and the CNI dnsname plugin (service names on the
   compose network) from Debian's packages when they are missing (as root);
2. the local base image of `make image-check` (made once, then cached), the two service images
   under the names docker-compose.yml gives them (with image-check's build code), and local
   stand-ins for the official postgres and redis images, which cannot be pulled here
   (deploy/compose-check/standins/, passed in with PARLEY_POSTGRES_IMAGE and PARLEY_REDIS_IMAGE);
3. a project of its own (`parley-cc-<random>`), an env file of its own with fresh random
   secrets (scripts/make_secrets.py, never the user's .env) and free ports on 127.0.0.1;
4. `podman-compose up` of the file, one dependency level at a time (see "depends_on" below),
   waiting on each `depends_on` condition the file states, then on every service's health;
5. tests/e2e against the published ports; a restart of chat-1, then the chat e2e tests against
   chat-1 again;
6. always `podman-compose down -v`, then removal of anything of the project still there
   (containers, network, volumes) and of the env file, a summary, and a non-zero exit code
   when any step failed. The whole run is bounded by --timeout.

depends_on: podman 4.3.1 (Debian bookworm) has no `podman wait --condition=healthy`, so
podman-compose 1.6.0 skips `service_healthy` with a warning, and `podman start` of a container
whose `--requires` dependency has its own dependencies fails ("not found in input list",
containers/podman-compose#921, fixed in podman 5.6). So this script starts each level with
`up -d --no-deps` and checks the conditions itself (healthy; exited with code 0). Health checks
run through systemd timers in podman, and there is no systemd here: a driver thread runs
`podman healthcheck run` on each container at its interval, as the timer would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from parley.devstack.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "image-check"))
import image_check as ic  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = ROOT / ".tools" / "compose-check"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
MAKE_SECRETS = ROOT / "scripts" / "make_secrets.py"
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"
DNSNAME_PACKAGE = "golang-github-containernetworking-plugin-dnsname"
DNSNAME_PLUGIN = Path("/usr/lib/cni/dnsname")
# What image-check passes as global options and per container, for podman-compose's own
# podman calls (it runs plain `podman`): see /work/shared/CONTAINERS.md.
CONTAINERS_CONF = """\
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
"""
PORT_VARIABLES = [
    "PARLEY_USER_PORT", "PARLEY_USER_METRICS_PORT", "PARLEY_CHAT_PORT",
    "PARLEY_CHAT_METRICS_PORT", "PARLEY_CHAT2_PORT", "PARLEY_CHAT2_METRICS_PORT",
    "PROMETHEUS_PORT", "JAEGER_UI_PORT",
]  # fmt: skip
DEFAULT_PORTS = {50051, 50052, 50053, 9101, 9102, 9103, 9090, 16686}
RESTARTED = "chat-1"
CHAT_TESTS = "tests/e2e/test_chat_service.py"


@dataclass(frozen=True)
class Standin:
    service: str
    variable: str  # the docker-compose.yml variable that names the image
    tag: str
    folder: Path


STANDINS = [
    Standin("postgres", "PARLEY_POSTGRES_IMAGE", "localhost/parley-standin-postgres:15",
            HERE / "standins" / "postgres"),
    Standin("redis", "PARLEY_REDIS_IMAGE", "localhost/parley-standin-redis:7",
            HERE / "standins" / "redis"),
]  # fmt: skip


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop, but clean up first."""


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_time(text: str) -> float:
    """A podman timestamp (RFC 3339 with nanoseconds) as seconds since the epoch."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip())
    text = re.sub(r" [A-Z]+$", "", text)  # "+0000 UTC" as `podman inspect` may print
    return dt.datetime.fromisoformat(text.replace(" ", "T", 1)).timestamp()


# -- tools and images ----------------------------------------------------------------------


def network_backend() -> str:
    """podman's network backend: `cni` or `netavark`."""
    return ic.run(
        [*ic.PODMAN, "info", "--format", "{{.Host.NetworkBackend}}"], capture=True
    ).stdout.strip()


def ensure_tools(detail: list[str]) -> None:
    path = os.environ["PATH"] + ":/usr/sbin"
    missing = [p for p in ic.APT_PACKAGES if shutil.which(p, path=path) is None]
    # Only CNI networking (Debian's podman 4.3) needs the dnsname plugin for service names;
    # netavark (podman 5's only backend) resolves them with aardvark-dns.
    needs_dnsname = bool(missing) or network_backend() == "cni"
    if needs_dnsname and not DNSNAME_PLUGIN.is_file():
        missing.append(DNSNAME_PACKAGE)
    if missing:
        ic.apt_install([*ic.APT_PACKAGES, DNSNAME_PACKAGE], missing)
        detail.append(f"installed {', '.join(missing)}")
    else:
        found = [*ic.APT_PACKAGES, str(DNSNAME_PLUGIN) if needs_dnsname else "netavark"]
        detail.append(f"found {', '.join(found)}")
    if not PODMAN_COMPOSE.is_file():
        raise RuntimeError(f"{PODMAN_COMPOSE} is missing: run `make sync` (it is in uv.lock)")
    versions = ic.run([str(PODMAN_COMPOSE), "--version"], capture=True).stdout.strip()
    detail.append(versions.replace("\n", ", "))


def service_images() -> list[ic.Image]:
    """image-check's images under the names docker-compose.yml gives them."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    for name, service in raw["services"].items():
        build = service.get("build")
        if build:
            # image-check builds from the repository root with its Dockerfile; so must compose.
            where = (build.get("context"), build.get("dockerfile", "Dockerfile"))
            if where != (".", ic.DOCKERFILE):
                raise RuntimeError(f"{name} builds {where}, not ('.', {ic.DOCKERFILE!r})")
            names[build["args"]["SERVICE"]] = service["image"]
    images = []
    for image in ic.IMAGES:
        name = names[image.name]
        # podman resolves the short name parley-user:dev to localhost/parley-user:dev.
        tag = name if "/" in name.split(":")[0] else f"localhost/{name}"
        images.append(replace(image, tag=tag))
    return images


def build_standin(standin: Standin, base: str, detail: list[str]) -> None:
    log = WORK / f"build-{standin.service}-standin.log"
    args = [
        *ic.PODMAN, "build", "--network", "host", *ic.ULIMITS, "--build-arg",
        f"BASE_IMAGE={base}", "-t", standin.tag, str(standin.folder),
    ]  # fmt: skip
    with open(log, "w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-20:])
        raise RuntimeError(f"podman build exited {result.returncode} (log: {log}):\n{tail}")
    detail.append(f"{standin.tag}, {ic.image_size(standin.tag)}")


# -- the project ---------------------------------------------------------------------------


@dataclass
class Project:
    name: str
    folder: Path
    env_file: Path
    settings: dict[str, str]
    ports: dict[str, int]
    env: dict[str, str]
    deadline: float
    log: Path
    started: bool = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def compose(self, *args: str, timeout: float = 180) -> str:
        command = [
            str(PODMAN_COMPOSE), "--in-pod", "false", "--env-file", str(self.env_file),
            "-p", self.name, "-f", str(COMPOSE_FILE), *args,
        ]  # fmt: skip
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=max(5.0, min(timeout, self.remaining())), check=False,
        )  # fmt: skip
        with open(self.log, "a") as out:
            out.write(f"\n$ {shlex.join(command)}\n{result.stderr}{result.stdout}")
        if result.returncode != 0:
            tail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-15:])
            raise RuntimeError(
                f"podman-compose {' '.join(args)} exited {result.returncode}:\n{tail}"
            )
        return result.stdout

    def podman(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ic.PODMAN, *args], env=self.env, text=True, capture_output=True, check=False,
            timeout=kwargs.pop("timeout", 60), **kwargs,
        )  # fmt: skip

    def containers(self) -> dict[str, str]:
        """service -> container name, of every container of the project."""
        result = self.podman(
            "ps", "-a", "--filter", f"label=io.podman.compose.project={self.name}",
            "--format", "json",
        )  # fmt: skip
        found = {}
        for entry in json.loads(result.stdout or "[]"):
            labels = entry.get("Labels") or {}
            service = labels.get("com.docker.compose.service")
            if service:
                found[service] = entry["Names"][0]
        return found

    def container(self, service: str) -> str:
        containers = self.containers()
        if service not in containers:
            raise RuntimeError(f"no container for {service} in project {self.name}")
        return containers[service]

    def inspect(self, container: str) -> dict[str, Any]:
        result = self.podman("inspect", container)
        if result.returncode != 0:
            raise RuntimeError(f"podman inspect {container}: {result.stderr.strip()}")
        data: dict[str, Any] = json.loads(result.stdout)[0]
        return data

    def logs(self, container: str, lines: int = 25) -> str:
        result = self.podman("logs", "--tail", str(lines), container)
        return (result.stdout + result.stderr).strip()


def make_project(deadline: float) -> Project:
    run_id = secrets.token_hex(4)
    folder = WORK / f"run-{run_id}"
    folder.mkdir(parents=True, mode=0o700)
    env_file = folder / "compose.env"
    result = subprocess.run(
        [sys.executable, str(MAKE_SECRETS), "--env", str(env_file), "--example", str(ENV_EXAMPLE)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"make_secrets.py exited {result.returncode}: {result.stderr.strip()}")
    ports = dict(zip(PORT_VARIABLES, free_ports(len(PORT_VARIABLES)), strict=True))
    if set(ports.values()) & DEFAULT_PORTS:  # free_ports takes ephemeral ports: never these
        raise RuntimeError(f"free ports {ports} include a default port")
    overrides = {name: str(port) for name, port in ports.items()}
    overrides["PARLEY_BIND_ADDRESS"] = "127.0.0.1"
    overrides |= {standin.variable: standin.tag for standin in STANDINS}
    settings: dict[str, str] = {}
    lines = []
    for line in env_file.read_text(encoding="utf-8").splitlines():
        name, equals, value = line.partition("=")
        if equals and not line.lstrip().startswith("#"):
            name = name.strip()
            value = overrides.pop(name, value)
            settings[name] = value
            line = f"{name}={value}"
        lines.append(line)
    for name, value in overrides.items():
        settings[name] = value
        lines.append(f"{name}={value}")
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")  # 0600 from make_secrets
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    # The shell's variables win over an env file in compose: drop every one the file sets,
    # so nothing of the user's (a PARLEY_USER_PORT, a COMPOSE_FILE) leaks into the run.
    env = {
        k: v for k, v in os.environ.items() if k not in settings and not k.startswith("COMPOSE_")
    }
    env["CONTAINERS_CONF"] = str(folder / "containers.conf")
    return Project(
        name=f"parley-cc-{run_id}", folder=folder, env_file=env_file, settings=settings,
        ports=ports, env=env, deadline=deadline, log=folder / "compose.log",
    )  # fmt: skip


# -- health --------------------------------------------------------------------------------


class HealthDriver(threading.Thread):
    """What podman's systemd timer does where there is systemd: `podman healthcheck run` on
    each running container of the project that has a health check, every its interval.
    podman itself applies start_period, retries and timeout and records the status."""

    def __init__(self, project: Project) -> None:
        super().__init__(daemon=True, name="health-driver")
        self.project = project
        self.stopped = threading.Event()
        self.runs = 0

    def run(self) -> None:
        due: dict[str, float] = {}  # container id + start time -> next run
        intervals: dict[str, float] = {}
        while not self.stopped.wait(0.5):
            try:
                result = self.project.podman(
                    "ps", "--filter", f"label=io.podman.compose.project={self.project.name}",
                    "--format", "json", timeout=30,
                )  # fmt: skip
                for entry in json.loads(result.stdout or "[]"):
                    cid = entry["Id"]
                    if cid not in intervals:
                        config = self.project.inspect(cid)["Config"].get("Healthcheck") or {}
                        test = config.get("Test") or []
                        has_check = bool(test) and test[0] != "NONE"
                        intervals[cid] = (config.get("Interval") or 30e9) / 1e9 if has_check else 0
                    if not intervals[cid]:
                        continue
                    key = f"{cid}-{entry.get('StartedAt')}"
                    now = time.monotonic()
                    if key not in due:
                        due[key] = now + min(intervals[cid], 1.0)
                    if now >= due[key]:
                        self.project.podman("healthcheck", "run", cid, timeout=30)
                        self.runs += 1
                        due[key] = time.monotonic() + intervals[cid]
            except Exception as error:  # noqa: BLE001 - a container may vanish mid-way
                print(f"    health driver: {error}", flush=True)


def condition_met(project: Project, service: str, condition: str, since: float = 0.0) -> bool:
    """Whether `service` meets a depends_on condition now; raises when it never will."""
    container = project.container(service)
    data = project.inspect(container)
    state = data["State"]
    status = state.get("Status")
    if condition == "service_completed_successfully":
        if status in ("exited", "stopped"):
            if state.get("ExitCode") != 0:
                raise RuntimeError(
                    f"{service} exited {state.get('ExitCode')}:\n{project.logs(container)}"
                )
            return True
        return False
    if status != "running":
        raise RuntimeError(f"{service} is {status} (exit {state.get('ExitCode')}):\n"
                           f"{project.logs(container)}")  # fmt: skip
    if condition == "service_started":
        return True
    if condition != "service_healthy":
        raise RuntimeError(f"unknown depends_on condition {condition!r}")
    health = state.get("Health") or state.get("Healthcheck") or {}
    if health.get("Status") == "unhealthy":
        last = (health.get("Log") or [{}])[-1]
        raise RuntimeError(
            f"{service} is unhealthy: {str(last.get('Output', '')).strip()[-500:]}\n"
            f"{project.logs(container)}"
        )
    if health.get("Status") != "healthy":
        return False
    # A status from before the container's latest start (a restart) does not count.
    started = max(since, parse_time(state["StartedAt"]))
    log = health.get("Log") or []
    return bool(log) and parse_time(log[-1]["Start"]) >= started and log[-1]["ExitCode"] == 0


def wait_for(
    project: Project, service: str, condition: str, timeout: float, since: float = 0.0
) -> float:
    started = time.monotonic()
    deadline = min(started + timeout, project.deadline)
    while not condition_met(project, service, condition, since):
        if time.monotonic() > deadline:
            container = project.container(service)
            what = (
                "before --timeout"
                if project.deadline < started + timeout
                else f"within {timeout:.0f}s"
            )
            raise RuntimeError(f"{service}: {condition} not met {what}\n{project.logs(container)}")
        time.sleep(0.5)
    return time.monotonic() - started


# -- the compose file's own dependency graph ---------------------------------------------


def dependency_levels(config: dict[str, Any]) -> list[list[str]]:
    """The services the default profile starts, in levels: each depends only on earlier ones."""
    services = {n: s for n, s in config["services"].items() if not s.get("profiles")}
    done: list[str] = []
    levels = []
    while len(done) < len(services):
        level = sorted(
            name for name, service in services.items()
            if name not in done and all(dep in done for dep in depends_on(service))
        )  # fmt: skip
        if not level:
            raise RuntimeError(f"a depends_on cycle among {sorted(set(services) - set(done))}")
        levels.append(level)
        done += level
    return levels


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (how or {}).get("condition", "service_started") for name, how in deps.items()}


# -- the e2e suite -------------------------------------------------------------------------


def e2e_env(project: Project) -> dict[str, str]:
    from parley.client.tokens import mint_token

    secret = project.settings["PARLEY_JWT_SECRET"]
    port = project.ports
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")},
        "PARLEY_USER_ADDR": f"127.0.0.1:{port['PARLEY_USER_PORT']}",
        "PARLEY_CHAT_ADDR": f"127.0.0.1:{port['PARLEY_CHAT_PORT']}",
        "PARLEY_CHAT2_ADDR": f"127.0.0.1:{port['PARLEY_CHAT2_PORT']}",
        "PARLEY_USER_METRICS_ADDR": f"127.0.0.1:{port['PARLEY_USER_METRICS_PORT']}",
        "PARLEY_CHAT_METRICS_ADDR": f"127.0.0.1:{port['PARLEY_CHAT_METRICS_PORT']}",
        "PARLEY_CHAT2_METRICS_ADDR": f"127.0.0.1:{port['PARLEY_CHAT2_METRICS_PORT']}",
        "PARLEY_JWT_SECRET": secret,
        "PARLEY_TOKEN": mint_token(secret, "1", ("users:write",)),
        "PARLEY_TOKEN_READONLY": mint_token(secret, "2"),
    }


def run_pytest(project: Project, name: str, paths: Sequence[str], detail: list[str]) -> None:
    report = project.folder / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={report}"]  # fmt: skip
    print(f"    $ {shlex.join(command[2:])}", flush=True)
    timeout = min(600.0, project.remaining())
    result = subprocess.run(command, cwd=ROOT, env=e2e_env(project), timeout=timeout, check=False)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped")  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pytest exited {result.returncode}: {summary}")
    if passed == 0:
        raise RuntimeError(f"pytest ran nothing: {summary}")
    detail.append(summary)


# -- the run -------------------------------------------------------------------------------


def observe_init_window(project: Project, detail: list[str]) -> None:
    """Probes Postgres over the socket and over TCP during its first start: the socket-only
    phase is where the old health check (pg_isready without -h) passed too early."""
    container = project.container("postgres")
    started = time.monotonic()
    socket_ready = tcp_ready = None
    while time.monotonic() - started < 90 and tcp_ready is None:
        now = time.monotonic() - started
        probe = ["exec", container, "pg_isready", "-q"]
        if socket_ready is None and project.podman(*probe, timeout=10).returncode == 0:
            socket_ready = now
        if project.podman(*probe, "-h", "127.0.0.1", timeout=10).returncode == 0:
            tcp_ready = now
        time.sleep(0.2)
    if tcp_ready is None:
        raise RuntimeError("Postgres did not accept TCP within 90s")
    if socket_ready is not None and socket_ready < tcp_ready:
        detail.append(
            f"socket ready at {socket_ready:.1f}s, TCP at {tcp_ready:.1f}s: a socket-only "
            f"health check would have passed {tcp_ready - socket_ready:.1f}s early"
        )
    else:
        detail.append(f"socket and TCP ready together at {tcp_ready:.1f}s (window not seen)")


def start_stack(report: ic.Report, project: Project) -> None:
    with report.step("compose config") as detail:
        config = yaml.safe_load(project.compose("config"))
        levels = dependency_levels(config)
        detail.append(" -> ".join("{" + ", ".join(level) + "}" for level in levels))
    project.started = True
    for number, level in enumerate(levels):
        waits = sorted({(dep, how) for name in level
                        for dep, how in depends_on(config["services"][name]).items()})  # fmt: skip
        if waits:
            with report.step(f"depends_on of {', '.join(level)}") as detail:
                for dep, how in waits:
                    seconds = wait_for(project, dep, how, timeout=180)
                    detail.append(f"{dep} {how} after {seconds:.1f}s more")
        with report.step(f"up -d --no-deps {' '.join(level)}") as detail:
            project.compose("up", "-d", "--no-deps", "--no-build", *level)
            detail.append(f"level {number}")
        if "postgres" in level:
            with report.step("postgres first-run init (socket vs TCP)", fatal=False) as detail:
                observe_init_window(project, detail)
    with report.step("every service healthy or completed") as detail:
        for name in levels[-1] if levels else []:
            service = config["services"][name]
            how = "service_healthy" if service.get("healthcheck") else "service_started"
            seconds = wait_for(project, name, how, timeout=120)
            detail.append(f"{name} {how.removeprefix('service_')} (+{seconds:.1f}s)")


def restart_replica(report: ic.Report, project: Project) -> None:
    with report.step(f"restart {RESTARTED}") as detail:
        container = project.container(RESTARTED)
        before = project.inspect(container)["State"]["StartedAt"]
        project.compose("restart", RESTARTED)
        after = project.inspect(container)["State"]["StartedAt"]
        if after == before:
            raise RuntimeError(f"{container} was not restarted (StartedAt {before})")
        seconds = wait_for(project, RESTARTED, "service_healthy", timeout=90,
                           since=parse_time(after))  # fmt: skip
        detail.append(f"started again at {after}, healthy {seconds:.1f}s later")
    with report.step(f"chat e2e against {RESTARTED} after its restart") as detail:
        run_pytest(project, "e2e-after-restart", [CHAT_TESTS], detail)


def tear_down(report: ic.Report, project: Project) -> None:
    """`down -v`, then whatever of the project is left, by its label and names."""
    started = time.monotonic()
    problems = []
    project.deadline = max(project.deadline, time.monotonic() + 120)  # cleanup gets its time
    if project.started:
        try:
            project.compose("down", "-v", "-t", "10", timeout=120)
        except Exception as error:  # noqa: BLE001
            problems.append(f"down -v: {str(error).splitlines()[0]}")
    label = f"label=io.podman.compose.project={project.name}"
    leftovers = project.podman("ps", "-aq", "--filter", label).stdout.split()
    if leftovers:
        problems.append(f"{len(leftovers)} containers left by down")
        project.podman("rm", "--force", "--time", "2", *leftovers, timeout=120)
    volumes = [v for v in project.podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
               if v.startswith(f"{project.name}_")]  # fmt: skip
    if volumes:
        problems.append(f"volumes left by down: {', '.join(volumes)}")
        project.podman("volume", "rm", "--force", *volumes)
    networks = [n for n in project.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
                if n.startswith(f"{project.name}_")]  # fmt: skip
    if networks:
        problems.append(f"networks left by down: {', '.join(networks)}")
        project.podman("network", "rm", "--force", *networks)
    still = project.podman("ps", "-aq", "--filter", label).stdout.split()
    shutil.rmtree(project.folder, ignore_errors=True)  # the env file holds the run's secrets
    seconds = time.monotonic() - started
    if still:
        report.results.append(ic.Result("down -v and clean up", False, seconds,
                                        f"containers remain: {still}"))  # fmt: skip
    elif problems and project.started:
        # Removed by hand: the run is clean, but `down -v` did not do it all.
        report.results.append(
            ic.Result("down -v and clean up", False, seconds, "; ".join(problems))
        )
    else:
        report.results.append(ic.Result(
            "down -v and clean up", True, seconds,
            f"no container, volume or network of {project.name} left; env file removed",
        ))  # fmt: skip


@contextmanager
def health_driver(project: Project) -> Iterator[HealthDriver]:
    driver = HealthDriver(project)
    driver.start()
    try:
        yield driver
    finally:
        driver.stopped.set()
        driver.join(timeout=35)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base-image", help="use this base image instead of making one")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds for the whole run before cleanup (default 900)")  # fmt: skip
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    report = ic.Report(title="compose-check")
    started = time.monotonic()
    deadline = started + args.timeout
    WORK.mkdir(parents=True, exist_ok=True)
    report.notes.append(
        "depends_on: NOT honoured by podman-compose 1.6.0 on podman 4.3.1 (service_healthy is "
        "skipped below podman 4.6; a plain `up` fails on podman's transitive --requires bug, "
        "containers/podman-compose#921). compose-check starts one dependency level at a time "
        "with `up -d --no-deps` and checks each condition itself; health checks are run by its "
        "driver (`podman healthcheck run`), as systemd's timer would."
    )
    project: Project | None = None
    driver: HealthDriver | None = None
    try:
        with report.step("podman, runc, debootstrap, dnsname, podman-compose") as detail:
            ensure_tools(detail)
        with report.step("base image") as detail:
            base = args.base_image or ic.make_base(detail)
            if args.base_image:
                detail.append(f"given: {base}")
        for image in service_images():
            with report.step(f"{image.name}: build as {image.tag}") as detail:
                ic.build_image(image, base, detail, log_dir=WORK)
        for standin in STANDINS:
            with report.step(f"{standin.service} stand-in: build") as detail:
                build_standin(standin, base, detail)
        with report.step("project, env file, ports") as detail:
            project = make_project(deadline)
            detail.append(f"{project.name}, {project.env_file.name} with new secrets, ports "
                          + ", ".join(f"{k}={v}" for k, v in project.ports.items()))  # fmt: skip
        with health_driver(project) as driver:
            start_stack(report, project)
            with report.step("e2e suite (tests/e2e)", fatal=False) as detail:
                run_pytest(project, "e2e", ["tests/e2e"], detail)
            restart_replica(report, project)
            report.notes.append(f"health checks run by the driver: {driver.runs}")
    except ic.Abort:
        pass
    except (Interrupted, KeyboardInterrupt) as error:
        report.results.append(ic.Result(f"interrupted ({error})", False, 0.0))
    except subprocess.TimeoutExpired as error:
        report.results.append(ic.Result("timed out", False, 0.0, str(error)))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if project is not None:
            if not report.ok and project.started:
                for service, container in sorted(project.containers().items()):
                    state = project.inspect(container)["State"]
                    print(f"--- {service} ({state.get('Status')}): last log lines\n"
                          f"{project.logs(container, 10)}")  # fmt: skip
            tear_down(report, project)
    if time.monotonic() > deadline:
        report.notes.append(f"stopped by --timeout {args.timeout:.0f}s")
    report.print_summary(time.monotonic() - started)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
