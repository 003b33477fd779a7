"""The chart matches what the services really do: it renders the chart and reads the code.

Ports, variables, health names, the drain and the stop signal come from the services' own
settings classes, servers, command lines and Dockerfiles, and the services are started as
their images start them to see that they answer the probes and drain on SIGTERM.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import signal
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.chassis import Env
from parley.chat_service import server as chat_server
from parley.chat_service import settings as chat_settings
from parley.chat_service.settings import ChatSettings
from parley.devstack import services as devstack
from parley.devstack.errors import DevstackError
from parley.proto.contract import USER_SERVICE, service_config
from parley.testing import free_port
from parley.testing.certificates import CertificateAuthority
from parley.user_service import server as user_server
from parley.user_service import settings as user_settings
from parley.user_service.settings import UserSettings

from .dockerfile import exec_form, image_config, service_image
from .env_reads import env_reads
from .helm import CHART, NAMESPACE, by_component, by_kind, named, pod_container, render
from .tools import REPO

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Service:
    name: str  # the chart's component, services/<name>/ and the Dockerfile's SERVICE
    grpc_port: int
    metrics_port: int
    readiness: str  # the health service name its readiness reflects
    settings: Callable[[Env], Any]

    @property
    def script(self) -> str:
        """The console script the image runs (its pyproject's only [project.scripts] entry)."""
        pyproject = tomllib.loads(
            (REPO / "services" / self.name / "pyproject.toml").read_text(encoding="utf-8")
        )
        (script,) = pyproject["project"]["scripts"]
        return str(script)


SERVICES = {
    "user": Service(
        "user",
        user_settings.DEFAULT_GRPC_PORT,
        user_settings.DEFAULT_METRICS_PORT,
        user_server.SERVICE_NAME,
        UserSettings.from_env,
    ),
    "chat": Service(
        "chat",
        chat_settings.DEFAULT_GRPC_PORT,
        chat_settings.DEFAULT_METRICS_PORT,
        chat_server.SERVICE_NAME,
        ChatSettings.from_env,
    ),
}


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest) -> Service:
    return SERVICES[request.param]


def _deployment(manifests: list[Any], service: Service) -> dict[str, Any]:
    (deployment,) = by_component(manifests, "Deployment", service.name)
    return dict(deployment)


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


def _container_env(
    manifests: list[Any], spec: dict[str, Any]
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """A container's variables: plain values (its ConfigMaps and `value`s) and Secret refs."""
    values: dict[str, str] = {}
    secrets: dict[str, tuple[str, str]] = {}
    for source in spec.get("envFrom", []):
        config = named(manifests, "ConfigMap", source["configMapRef"]["name"])
        values.update(config["data"])
    for entry in spec.get("env", []):
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            secrets[entry["name"]] = (ref["name"], ref["key"])
    return values, secrets


def _secret_value(manifests: list[Any], name: str, key: str) -> str | None:
    """A key of a Secret the chart renders; None for an existingSecret made outside it."""
    found = [m for m in by_kind(manifests, "Secret") if m["metadata"]["name"] == name]
    if not found:
        return None
    assert key in found[0]["data"], f"Secret {name} has no key {key}"
    return base64.b64decode(found[0]["data"][key]).decode()


# Stand-ins for the values of a Secret the chart does not make (existingSecret).
_EXTERNAL_SECRETS = {
    "PARLEY_DATABASE_URL": "postgresql://parley@postgres:5432/parley",
    "PARLEY_REDIS_URL": "redis://redis:6379/0",
    "PARLEY_JWT_SECRET": os.urandom(32).hex(),
    "REDIS_PASSWORD": os.urandom(16).hex(),
}
# $(NAME) in an env value: the kubelet puts in the value of NAME, defined earlier.
_DEPENDENT = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _referenced(spec: dict[str, Any]) -> set[str]:
    """Variables only there to be put into others' values with $(NAME)."""
    return {
        m.group(1) for e in spec.get("env", []) for m in _DEPENDENT.finditer(e.get("value", ""))
    }


@functools.cache
def _tls_stand_ins() -> dict[str, str]:
    """PEM files standing in for the mounted TLS Secret, by the name of the key."""
    directory = Path(tempfile.mkdtemp(prefix="parley-chart-tls-"))
    ca = CertificateAuthority(directory, "chart")
    pair = ca.server()
    return {
        "tls.crt": str(pair.cert_file),
        "tls.key": str(pair.key_file),
        "ca.crt": str(ca.cert_file),
    }


def _resolved_env(manifests: list[Any], spec: dict[str, Any]) -> dict[str, str]:
    values, secrets = _container_env(manifests, spec)
    for variable, (name, key) in secrets.items():
        value = _secret_value(manifests, name, key)
        values[variable] = _EXTERNAL_SECRETS[variable] if value is None else value
    for variable, value in values.items():
        values[variable] = _DEPENDENT.sub(lambda m: values[m.group(1)], value)
    # Files from the TLS Secret exist only in a pod: point the settings at real stand-ins.
    for variable, value in values.items():
        if variable.endswith("_FILE") and Path(value).name in _tls_stand_ins():
            values[variable] = _tls_stand_ins()[Path(value).name]
    return values


def test_ports_are_the_services_own(helm4: str, ci_values: Path, service: Service) -> None:
    manifests = render(helm4, ci_values)
    deployment = _deployment(manifests, service)
    spec = pod_container(_pod_spec(deployment), service.name)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    # What the process will listen on, as its settings code reads the chart's variables.
    settings = service.settings(Env(_resolved_env(manifests, spec)))
    expected = {"grpc": service.grpc_port, "metrics": service.metrics_port}
    if settings.server.health_port is not None:
        # TLS: the probes go to the plain-text health-only port.
        expected["health"] = settings.server.health_port
    assert ports == expected
    assert (settings.server.port, settings.server.metrics_port) == (
        ports["grpc"],
        ports["metrics"],
    )
    probed = ports.get("health", ports["grpc"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert spec[probe]["grpc"]["port"] == probed, probe

    services = by_component(manifests, "Service", service.name)
    cluster_ip = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert len(cluster_ip) == 1
    assert cluster_ip[0]["spec"]["type"] == "ClusterIP"
    assert {(p["name"], p["targetPort"]) for p in cluster_ip[0]["spec"]["ports"]} == {
        ("grpc", "grpc"),
        ("metrics", "metrics"),
    }

    exposed = image_config(service_image(service.name))["EXPOSE"]
    assert {int(p) for p in exposed.split()} == {service.grpc_port, service.metrics_port}


def test_every_variable_the_chart_sets_is_one_the_service_reads(
    helm4: str, ci_values: Path
) -> None:
    manifests = render(helm4, ci_values)
    reads = env_reads()
    unread = []
    workloads = [*by_kind(manifests, "Deployment"), *by_kind(manifests, "Job")]
    for workload in workloads:
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in ("user", "chat", "migrations"):
            continue  # in-chart Postgres and Redis: their images' own variables
        pod = _pod_spec(workload)
        for spec in [*pod.get("initContainers", []), *pod["containers"]]:
            command = "migrate" if spec.get("args") == ["migrate"] else component
            assert spec.get("args") == (["migrate"] if command == "migrate" else ["serve"])
            values, secrets = _container_env(manifests, spec)
            # envFrom of the component's ConfigMap also reaches its migrate init container,
            # which ignores the serving settings; what it is given explicitly must be read.
            explicit = {e["name"] for e in spec.get("env", [])}
            known = reads[component] if spec.get("envFrom") else reads[command]
            for variable in sorted({*values, *secrets} - _referenced(spec)):
                allowed = reads[command] if variable in explicit else known
                if variable not in allowed:
                    unread.append(f"{workload['metadata']['name']}/{spec['name']}: {variable}")
            # The service accepts every value (a ConfigError names the variable).
            if command != "migrate":
                SERVICES[component].settings(Env(_resolved_env(manifests, spec)))
    assert not unread, "variables set by the chart that no code reads:\n" + "\n".join(unread)


def test_probes_ask_for_the_health_names_the_code_registers(helm4: str, service: Service) -> None:
    manifests = render(helm4, CHART / "ci" / "default-values.yaml")
    spec = pod_container(_pod_spec(_deployment(manifests, service)), service.name)
    assert spec["startupProbe"]["grpc"]["service"] == ""
    assert spec["livenessProbe"]["grpc"]["service"] == ""
    assert spec["readinessProbe"]["grpc"]["service"] == service.readiness


def test_termination_grace_covers_prestop_and_drain(
    helm4: str, ci_values: Path, service: Service
) -> None:
    manifests = render(helm4, ci_values)
    pod = _pod_spec(_deployment(manifests, service))
    spec = pod_container(pod, service.name)
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = float(command[1])
    server = service.settings(Env(_resolved_env(manifests, spec))).server
    needed = pre_stop + server.shutdown_delay + server.shutdown_grace
    assert server.shutdown_grace > 0 and pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} leaves no time "
        f"after preStop {pre_stop}s + delay {server.shutdown_delay}s + grace "
        f"{server.shutdown_grace}s"
    )


def test_image_runs_the_service_command_and_stops_it_with_sigterm(
    helm4: str, service: Service
) -> None:
    last = image_config(service_image(service.name))
    assert last["STOPSIGNAL"] == "SIGTERM"
    # Exec form: the service is PID 1 and receives the signal itself (no shell in between).
    assert exec_form(last["ENTRYPOINT"]) == [service.script]
    assert exec_form(last["CMD"]) == ["serve"]
    uid = last["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0

    manifests = render(helm4, CHART / "ci" / "default-values.yaml")
    pod = _pod_spec(_deployment(manifests, service))
    spec = pod_container(pod, service.name)
    assert "command" not in spec, "the chart must not replace the image's ENTRYPOINT"
    assert spec["args"] == ["serve"]
    assert spec["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_chat_dials_the_headless_user_service_with_round_robin(helm4: str, ci_values: Path) -> None:
    manifests = render(helm4, ci_values)
    chat = pod_container(_pod_spec(_deployment(manifests, SERVICES["chat"])), "chat")
    target = ChatSettings.from_env(Env(_resolved_env(manifests, chat))).user_service
    match = re.fullmatch(r"dns:///([^:/]+)\.([^.]+)\.svc\.cluster\.local:(\d+)", target)
    assert match, f"chat dials {target!r}, not a dns:/// name of a cluster Service"
    name, namespace, port = match.group(1), match.group(2), int(match.group(3))
    assert namespace == NAMESPACE

    headless = named(manifests, "Service", name)
    assert headless["spec"]["clusterIP"] == "None"
    user = _deployment(manifests, SERVICES["user"])
    pod_labels = user["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    user_ports = {p["name"]: p["containerPort"] for p in pod_container(
        _pod_spec(user), "user")["ports"]}  # fmt: skip
    assert [(p["name"], p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [
        ("grpc", user_ports["grpc"], "grpc")
    ]
    assert port == user_ports["grpc"]
    policy = json.loads(service_config(USER_SERVICE))["loadBalancingConfig"]
    assert policy == [{"round_robin": {}}], "chat does not balance over the resolved pods"


# --- The processes themselves -------------------------------------------------------------


@pytest.fixture
def started(helm4: str, service: Service, tmp_path: Path) -> Iterator[devstack.Service]:
    """The service started as its image starts it (`<script> serve`, by parley.devstack's
    Service), with the kind variant's settings; its output goes to a log.

    Postgres, Redis and UserService are unreachable addresses here, so readiness is
    NOT_SERVING; ports are free ones of 127.0.0.1, and the checks and drain are kept short.
    """
    manifests = render(helm4, CHART / "ci" / "kind-values.yaml")
    spec = pod_container(_pod_spec(_deployment(manifests, service)), service.name)
    assert spec["args"] == ["serve"], "devstack's Service runs `<script> serve`"
    env = _resolved_env(manifests, spec) | {
        "PARLEY_GRPC_HOST": "127.0.0.1",
        "PARLEY_METRICS_HOST": "127.0.0.1",
        "PARLEY_DATABASE_URL": "postgresql://parley@127.0.0.1:1/parley",
        "PARLEY_REDIS_URL": "redis://127.0.0.1:1/0",
        "PARLEY_USER_SERVICE_ADDR": "127.0.0.1:1",
        "PARLEY_DB_POOL_TIMEOUT": "200ms",
        "PARLEY_HEALTH_CHECK_INTERVAL": "1s",
        "PARLEY_SHUTDOWN_DELAY": "500ms",
    }
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}, **env}
    ports = free_port(), free_port()
    what = devstack.ServiceSpec(service.script, service.script, service.readiness, *ports)
    process = devstack.Service(what, environ, log_path=tmp_path / f"{service.script}.log")
    try:
        try:
            process.wait_serving(STARTUP_TIMEOUT, name="")  # it listens and answers
        except DevstackError as error:
            pytest.fail(str(error), pytrace=False)
        yield process
    finally:
        process.stop(signal.SIGKILL, 10)


def test_the_service_answers_its_probe_names_and_drains_on_sigterm(
    started: devstack.Service, service: Service
) -> None:
    with grpc.insecure_channel(started.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(name: str) -> str:
            try:
                response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            except grpc.RpcError as error:
                return str(error.code().name)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

        assert status("") == "SERVING"
        # Known to the server (NOT_FOUND would mean the probe asks for a name it never set);
        # NOT_SERVING because Postgres is unreachable here.
        assert status(service.readiness) == "NOT_SERVING"
        assert status("no.such.Service") == "NOT_FOUND"

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=STOP_TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started.process.send(signal.SIGTERM)
        # The drain turns liveness NOT_SERVING before the listener closes.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()

    assert started.process.wait(STOP_TIMEOUT), f"still running {STOP_TIMEOUT:g}s after SIGTERM"
    assert started.process.returncode == 0, started.log_text()
    output = started.log_text()  # all of it: the process has exited
    for pattern in ("draining", "stopped"):
        assert re.search(pattern, output), f"no {pattern!r} in the output:\n{output}"
