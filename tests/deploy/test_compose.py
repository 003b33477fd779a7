"""docker-compose.yml is a valid compose file that starts a working stack: migrations before
the services, health-checked dependencies, settings the services really read, Prometheus on
every metrics port. Interpolation uses the values of .env.example, as `docker compose` would
with that file copied to .env."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from parley.chassis import Env
from parley.chat_service.server import SERVICE_NAME as CHAT_SERVICE
from parley.chat_service.settings import ChatSettings
from parley.user_service.server import SERVICE_NAME as USER_SERVICE
from parley.user_service.settings import UserSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SETTINGS = {"user": UserSettings.from_env, "chat": ChatSettings.from_env}
READINESS = {"user": USER_SERVICE, "chat": CHAT_SERVICE}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(2) or ""), value
        )
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    resolved: dict[str, Any] = _interpolate(raw, _env_example())
    return resolved


def _component(service: dict[str, Any]) -> str | None:
    """ "user" or "chat" for a service running a Parley image (from the Dockerfile it builds)."""
    dockerfile = service.get("build", {}).get("dockerfile", "")
    match = re.fullmatch(r"services/([a-z-]+)/Dockerfile", dockerfile)
    return match.group(1) if match else None


def _parley(compose: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Parley services: name -> (component, command: "serve" or "migrate", definition)."""
    found = {}
    for name, service in compose["services"].items():
        component = _component(service)
        if component is not None:
            command = " ".join(service.get("command", ["serve"]))
            found[name] = (component, command, service)
    return found


def _serving(compose: dict[str, Any]) -> dict[str, tuple[str, Any, dict[str, Any]]]:
    """Serving Parley services with the settings their code makes of their environment."""
    return {
        name: (component, SETTINGS[component](Env(service["environment"])), service)
        for name, (component, command, service) in _parley(compose).items()
        if command == "serve"
    }


def test_the_compose_file_matches_the_compose_spec(deploy: Any) -> None:
    tool = deploy.venv_tool("check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_build_has_its_dockerfile(compose: dict[str, Any]) -> None:
    images: dict[str, dict[str, Any]] = {}
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        build = service["build"]
        dockerfile = REPO / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        # Services sharing an image tag must build it the same way, or the tag is a race.
        assert images.setdefault(service["image"], build) == build, name
    built = {Path(b["context"], b["dockerfile"]).as_posix() for b in images.values()}
    for dockerfile in sorted(REPO.glob("services/*/Dockerfile")):
        assert dockerfile.relative_to(REPO).as_posix() in built, f"nothing builds {dockerfile}"


def test_parley_services_get_only_settings_their_command_reads(
    deploy: Any, compose: dict[str, Any]
) -> None:
    reads = deploy.env_reads()
    services = _parley(compose)
    assert {c for c, command, _ in services.values() if command == "serve"} == {"user", "chat"}
    for name, (component, command, service) in services.items():
        assert command in ("serve", "migrate"), f"{name}: unknown command {command!r}"
        known = reads["migrate" if command == "migrate" else component]
        unread = sorted(set(service["environment"]) - known)
        assert not unread, f"{name} is given variables `parley-{component} {command}` ignores"
        if command == "serve":  # the settings code accepts every value (or names the culprit)
            SETTINGS[component](Env(service["environment"]))


def test_env_example_lists_every_setting_the_compose_file_takes() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    defaults = {m.group(1): m.group(2) for m in _VARIABLE.finditer(text) if m.group(1)}
    example = _env_example()
    assert set(defaults) == set(example), (
        f"only in docker-compose.yml: {sorted(set(defaults) - set(example))}; "
        f"only in .env.example: {sorted(set(example) - set(defaults))}"
    )
    differing = {k: (defaults[k], example[k]) for k in example if defaults[k] != example[k]}
    assert not differing, f"compose default vs .env.example: {differing}"
    leftover = re.sub(_VARIABLE, "", text)
    assert "$" not in leftover.replace("$${", ""), "an interpolation form this test cannot read"


def test_each_service_starts_after_its_own_migrations_and_healthy_stores(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    parley = _parley(compose)
    for store in ("postgres", "redis"):
        assert "healthcheck" in services[store], f"{store} has no health check"
        volumes = [v.split(":")[0] for v in services[store].get("volumes", [])]
        assert volumes and all(v in compose["volumes"] for v in volumes), f"{store}: named volume"
    for name, (component, command, service) in parley.items():
        depends = service.get("depends_on", {})
        if command == "migrate":
            assert depends.get("postgres") == {"condition": "service_healthy"}, name
            assert service.get("restart") == "no", name
            continue
        migrations = [
            dep
            for dep, how in depends.items()
            if how == {"condition": "service_completed_successfully"}
            and parley.get(dep, ("", "", {}))[:2] == (component, "migrate")
        ]
        assert migrations, f"{name} does not wait for `parley-{component} migrate` to complete"
        if component == "chat":
            assert depends.get("redis") == {"condition": "service_healthy"}, name


def test_chat_dials_the_user_service(compose: dict[str, Any]) -> None:
    serving = _serving(compose)
    users = {name: settings for name, (component, settings, _) in serving.items()
             if component == "user"}  # fmt: skip
    for name, (component, settings, _) in serving.items():
        if component != "chat":
            continue
        match = re.fullmatch(r"(?:dns:///)?([a-z0-9-]+):(\d+)", settings.user_service)
        assert match, f"{name}: PARLEY_USER_SERVICE_ADDR={settings.user_service!r}"
        host, port = match.group(1), int(match.group(2))
        assert host in users, f"{name} dials {host}, which is not a user service"
        assert port == users[host].server.port


def test_ports_and_health_checks_are_the_services_own(compose: dict[str, Any]) -> None:
    for name, (component, settings, service) in _serving(compose).items():
        published = {int(str(p).rsplit(":", 1)[1]) for p in service["ports"]}
        assert published == {settings.server.port, settings.server.metrics_port}, name
        check = " ".join(service["healthcheck"]["test"])
        assert f"'127.0.0.1:{settings.server.port}'" in check, name
        assert f"service='{READINESS[component]}'" in check, name


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, f"cannot read the duration {duration!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def test_stop_grace_period_covers_the_drain(compose: dict[str, Any]) -> None:
    for name, (_, settings, service) in _serving(compose).items():
        # Docker's default is 10 s; the drain needs the delay, the grace and a moment to exit.
        period = _seconds(service.get("stop_grace_period", "10s"))
        needed = settings.server.shutdown_delay + settings.server.shutdown_grace
        assert period > needed, f"{name}: stop_grace_period {period}s <= drain {needed}s"


def test_prometheus_scrapes_every_metrics_port(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_file = REPO / mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"{name}:{settings.server.metrics_port}"
                for name, (_, settings, _) in _serving(compose).items()}  # fmt: skip
    assert targets == expected
