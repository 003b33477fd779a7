"""Checks of Parley's deployment files: Dockerfiles, docker compose, the Helm chart, kind and CI.

They need Helm 3 and Helm 4 (HELM3 and HELM4, by default the ones `make helm-tools` puts in
.tools/), and hadolint, check-jsonschema and kubernetes-validate from the dev dependencies.
Under `make deploy-check` (PARLEY_DEPLOY_CHECKS=required) and in CI (CI=true) a missing tool
fails the check; run by hand elsewhere, its checks are skipped and the reason is printed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from parley.chassis import AuthSettings, ConfigError, DatabaseSettings, Env
from parley.chassis.config import log_settings
from parley.chat_service.settings import ChatSettings
from parley.testing import free_port
from parley.testing.redis_server import REDIS_SERVER
from parley.user_service.settings import UserSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "parley"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "parley"
NAMESPACE = "parley"
# The Prometheus Operator API the chart looks for before it renders ServiceMonitor and
# PrometheusRule; passed to `helm template`, which has no cluster to ask.
MONITORING_API = "monitoring.coreos.com/v1"
HELM_MAJORS = {"helm3": "v3.", "helm4": "v4."}

Manifest = dict[str, Any]


def tools_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("PARLEY_DEPLOY_CHECKS") == "required"


def missing_tool(message: str) -> None:
    """Fails under make and in CI; skips with the reason when run by hand."""
    if tools_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    """A console script of the dev dependencies, next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        found = shutil.which(name)
        if found is None:
            missing_tool(f"{name} is not installed: run `make sync` (it is a dev dependency)")
        assert found is not None
        return found
    return str(path)


@functools.cache
def _helm_binary(name: str) -> str:
    variable = name.upper()
    path = os.environ.get(variable) or str(REPO / ".tools" / name / "helm")
    if not os.access(path, os.X_OK):
        missing_tool(f"{variable}={path} is not an executable Helm: run `make helm-tools`")
    version = subprocess.run(
        [path, "version", "--template", "{{.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    assert version.startswith(HELM_MAJORS[name]), f"{variable}={path} is Helm {version}"
    return path


@pytest.fixture(params=sorted(HELM_MAJORS))
def helm(request: pytest.FixtureRequest) -> str:
    """Each test that takes `helm` runs once with Helm 3 and once with Helm 4."""
    return _helm_binary(request.param)


@pytest.fixture(scope="session")
def helm4() -> str:
    return _helm_binary("helm4")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    # An empty KUBECONFIG keeps helm away from any cluster this machine may know.
    env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": os.devnull}
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)


@functools.cache
def _render(helm: str, values: tuple[str, ...], kube_version: str, extra: tuple[str, ...]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", kube_version, "--api-versions", MONITORING_API]
    for path in values:
        args += ["--values", path]
    result = run_helm(helm, *args, *extra)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(
    helm: str, values: Path | None = None, kube_version: str = "", *extra: str
) -> list[Manifest]:
    """The chart's manifests, rendered by `helm template` (cached per arguments)."""
    version = kube_version or supported_kube_versions()[-1]
    text = _render(helm, (str(values),) if values else (), version, extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    return loaded


@functools.cache
def supported_kube_versions() -> tuple[str, ...]:
    """The lowest and highest Kubernetes minor kubernetes-validate has that Chart.yaml allows."""
    from kubernetes_validate.utils import all_versions
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    # Chart.yaml says ">=1.27.0-0" (semver, "-0" admits pre-releases); as a PEP 440 specifier
    # the "-0" suffix is dropped and pre-releases are allowed.
    constraint = re.sub(r"-0\b", "", chart()["kubeVersion"])
    specifier = SpecifierSet(constraint.replace(" ", ","), prereleases=True)
    versions = [v for v in all_versions() if Version(v) in specifier]
    assert versions, f"kubernetes-validate has no version inside kubeVersion {constraint!r}"
    return (versions[0], versions[-1]) if len(versions) > 1 else (versions[0],)


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in by_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(manifests: list[Manifest], kind: str, name: str) -> list[Manifest]:
    """Resources of one component (app.kubernetes.io/component label), e.g. "user"."""
    return [
        m
        for m in by_kind(manifests, kind)
        if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name
    ]


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r} in the pod spec")


# --- What the services read -------------------------------------------------------------


class _RecordingEnviron(Mapping[str, str]):
    """An environment that remembers the name of every variable looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _reads(load: Callable[[Env], object], values: Mapping[str, str]) -> set[str]:
    recorder = _RecordingEnviron(values)
    try:
        load(Env(recorder))
    except ConfigError:
        pass  # a branch that needs files (RS256 keys): the names were read before it failed
    return recorder.read


_REQUIRED = {
    "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0",
}
_RS256 = {**_REQUIRED, "PARLEY_JWT_ALGORITHM": "RS256"}


def _serve_reads(settings: Callable[[Env], object]) -> frozenset[str]:
    names: set[str] = set()
    for values in (_REQUIRED, _RS256):
        names |= _reads(settings, values)
    # `serve` reads the log settings before it builds the settings object.
    return frozenset(names | _reads(log_settings, _REQUIRED))


@functools.cache
def env_reads() -> dict[str, frozenset[str]]:
    """PARLEY_* variables each command reads, found by running the settings code itself.

    Keys: "user" and "chat" (`serve`), "migrate" (`parley-user migrate`, `parley-chat migrate`).
    """
    reads = {
        "user": _serve_reads(UserSettings.from_env),
        "chat": _serve_reads(ChatSettings.from_env),
        "migrate": frozenset(
            _reads(DatabaseSettings.from_env, _REQUIRED) | _reads(log_settings, _REQUIRED)
        ),
    }
    # The recorder must have seen the basics, or it recorded nothing useful.
    assert {"PARLEY_GRPC_PORT", "PARLEY_JWT_SECRET"} <= reads["user"]
    assert {"PARLEY_REDIS_URL", "PARLEY_USER_SERVICE_ADDR"} <= reads["chat"]
    assert _reads(AuthSettings.from_env, _RS256) <= reads["user"] & reads["chat"]
    return reads


# --- The Dockerfile -------------------------------------------------------------------------

# Both service images come from this one file: `--build-arg SERVICE=<name>`, one of
# image_services(), picks the workspace member services/<name> and the stage service-<name>.
DOCKERFILE = REPO / "Dockerfile"
_ARG_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found = []
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


@dataclass(frozen=True)
class DockerStage:
    """One FROM of a Dockerfile, with the build arguments in scope substituted."""

    base: str  # the image or stage it is built FROM
    name: str | None  # its AS name
    instructions: tuple[tuple[str, str], ...]  # after the FROM; ARG lines as written


def dockerfile_stages(path: Path, **build_args: str) -> list[DockerStage]:
    """The stages of a Dockerfile built with `--build-arg NAME=value` for each of build_args.

    As Docker does: an ARG before the first FROM may be used in FROM lines; inside a stage an
    argument is substituted only after its ARG line (which may take the global default).
    Only ARG values are substituted; $PATH in an ENV, say, stays as written.
    """
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, dict[str, str], list[tuple[str, str]]]] = []

    def expand(text: str, scope: Mapping[str, str]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            return scope.get(name, match.group(0))

        return _ARG_REFERENCE.sub(value, text)

    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            parts = expand(rest, global_args).split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append((parts[0], name, {}, []))
        elif word == "ARG":
            name, has_default, default = rest.partition("=")
            if not stages:
                global_args[name] = build_args.get(name, default)
                continue
            if name in build_args:
                stages[-1][2][name] = build_args[name]
            else:
                stages[-1][2][name] = default if has_default else global_args.get(name, "")
            stages[-1][3].append((word, rest))
        elif stages:
            stages[-1][3].append((word, expand(rest, stages[-1][2])))
    return [DockerStage(base, name, tuple(body)) for base, name, _, body in stages]


def dockerfile_image(path: Path, **build_args: str) -> list[DockerStage]:
    """The stages an image is made of, root first: the last stage, the stage it is built FROM,
    and so on back to a stage built FROM an image that is no stage of the file."""
    stages = dockerfile_stages(path, **build_args)
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [stages[-1]]
    while chain[-1].base in by_name:
        assert len(chain) <= len(stages), "a stage is built FROM itself"
        chain.append(by_name[chain[-1].base])
    return chain[::-1]


def image_config(stages: Sequence[DockerStage]) -> dict[str, str]:
    """The image configuration those stages give, as Docker computes it: the last USER,
    STOPSIGNAL, WORKDIR, ENTRYPOINT and CMD; EXPOSE collects the ports of every stage; and an
    ENTRYPOINT resets a CMD inherited from an earlier stage."""
    config: dict[str, str] = {}
    ports: list[str] = []
    for stage in stages:
        cmd_in_stage = False
        for word, rest in stage.instructions:
            if word == "EXPOSE":
                ports += [p for p in rest.split() if p not in ports]
            elif word == "ENTRYPOINT":
                config["ENTRYPOINT"] = rest
                if not cmd_in_stage:
                    config.pop("CMD", None)
            elif word in ("USER", "STOPSIGNAL", "CMD", "WORKDIR"):
                config[word] = rest
                cmd_in_stage |= word == "CMD"
    if ports:
        config["EXPOSE"] = " ".join(ports)
    return config


@functools.cache
def image_services() -> tuple[str, ...]:
    """The values of the Dockerfile's SERVICE: the names of its service-<name> stages."""
    names = [s.name for s in dockerfile_stages(DOCKERFILE, SERVICE="") if s.name]
    return tuple(n.removeprefix("service-") for n in names if n.startswith("service-"))


def service_image(service: str) -> list[DockerStage]:
    """The stages of the image `--build-arg SERVICE=<service>` builds from the Dockerfile."""
    return dockerfile_image(DOCKERFILE, SERVICE=service)


def exec_form(arguments: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None for the shell form."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# --- A Redis container's command, run on this machine ---------------------------------------


@dataclass
class RedisRun:
    """redis-server started by a container's `sh -c` command; `cli` runs redis-cli as the
    container's probes do, with the environment they would have."""

    process: subprocess.Popen[str]
    port: int
    env: dict[str, str]

    def cli(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        """redis-cli ARGS; a variable given as None is taken out of the environment."""
        full = {k: v for k, v in {**self.env, **env}.items() if v is not None}
        return subprocess.run(
            ["redis-cli", *args], env=full, capture_output=True, text=True, timeout=10
        )

    def cmdline(self) -> str:
        """The server's command line, as `ps` shows it."""
        return Path(f"/proc/{self.process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text + "\n", encoding="utf-8")
    path.chmod(0o755)


def redis_command_env(directory: Path) -> tuple[dict[str, str], int]:
    """The environment to run a Redis container's command (["sh", "-c", script]) in on this
    machine, and the port its server will listen on. The image's entry point stands in as
    `exec "$@"` (what it does for a non-root user); redis-server and redis-cli are pointed
    at a free port of 127.0.0.1 and at `directory`."""
    server = Path(REDIS_SERVER)
    # The redis-cli of the same installation as the server, as in the image.
    client = str(server.with_name("redis-cli"))
    if not os.access(server, os.X_OK) or not os.access(client, os.X_OK):
        missing_tool(f"{server} and redis-cli are needed (PARLEY_TEST_REDIS_SERVER names one)")
    port = free_port()
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(bin_dir / "docker-entrypoint.sh", 'exec "$@"')
    # Options after the stdin "-" override the configuration, as on the command line.
    _script(
        bin_dir / "redis-server",
        f'exec {server} "$@" --port {port} --bind 127.0.0.1 --dir {directory} --save ""',
    )
    _script(bin_dir / "redis-cli", f'exec {client} -p {port} "$@"')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, port


@contextmanager
def run_redis_command(
    command: Sequence[str], env: Mapping[str, str], directory: Path
) -> Iterator[RedisRun]:
    """The command run as `redis_command_env` describes, until the server is ready."""
    base, port = redis_command_env(directory)
    full_env = {**base, **env}
    process = subprocess.Popen(
        list(command), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines: list[str] = []
    ready = threading.Event()

    def read(stream: Any) -> None:
        for line in stream:
            lines.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # the end of its output: it exited

    reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
    reader.start()
    try:
        ready.wait(timeout=10)
        if process.poll() is not None or not any("Ready to accept" in x for x in lines):
            pytest.fail(f"redis-server did not start:\n{''.join(lines)}")
        yield RedisRun(process, port, full_env)
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)
        reader.join(timeout=10)
        process.stdout.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests taking `ci_values` run once per deploy/helm/parley/ci/*-values.yaml, tests taking
    # `kube_version` once per Kubernetes version the chart supports (see Chart.yaml).
    if "ci_values" in metafunc.fixturenames:
        metafunc.parametrize("ci_values", CI_VALUES, ids=[p.name for p in CI_VALUES])
    if "kube_version" in metafunc.fixturenames:
        metafunc.parametrize("kube_version", supported_kube_versions())


class Deploy:
    """What the deploy checks share; tests get it from the `deploy` fixture."""

    repo = REPO
    chart_dir = CHART
    ci_values = CI_VALUES
    release = RELEASE
    namespace = NAMESPACE
    monitoring_api = MONITORING_API
    chart = staticmethod(chart)
    render = staticmethod(render)
    helm_binary = staticmethod(_helm_binary)
    run_helm = staticmethod(run_helm)
    supported_kube_versions = staticmethod(supported_kube_versions)
    by_kind = staticmethod(by_kind)
    named = staticmethod(named)
    component = staticmethod(component)
    container = staticmethod(container)
    env_reads = staticmethod(env_reads)
    venv_tool = staticmethod(venv_tool)
    missing_tool = staticmethod(missing_tool)
    dockerfile = DOCKERFILE
    dockerfile_instructions = staticmethod(dockerfile_instructions)
    dockerfile_stages = staticmethod(dockerfile_stages)
    dockerfile_image = staticmethod(dockerfile_image)
    image_config = staticmethod(image_config)
    image_services = staticmethod(image_services)
    service_image = staticmethod(service_image)
    exec_form = staticmethod(exec_form)
    redis_command_env = staticmethod(redis_command_env)
    run_redis_command = staticmethod(run_redis_command)


@pytest.fixture(scope="session")
def deploy() -> type[Deploy]:
    return Deploy
