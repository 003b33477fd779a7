"""docker-compose.yml is a valid compose file that starts a working stack: migrations before
the services, health-checked dependencies, settings the services really read, Prometheus on
every metrics port, Jaeger for traces only with its profile (and tracing off without it),
secrets only from .env and ports on 127.0.0.1. Interpolation uses the .env that `make
secrets` makes from .env.example (the script is run for real), as `docker compose` would."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from parley.chassis import DatabaseSettings, Env
from parley.chassis.sample_secrets import url_password
from parley.chassis.tracing import TracingSettings
from parley.chat_service.server import SERVICE_NAME as CHAT_SERVICE
from parley.chat_service.settings import ChatSettings
from parley.user_service.server import SERVICE_NAME as USER_SERVICE
from parley.user_service.settings import UserSettings

from .dockerfile import image_services, service_image
from .env_reads import env_reads
from .redis_command import redis_command_env, run_redis_command
from .tools import REPO, venv_tool

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
MAKE_SECRETS = REPO / "scripts" / "make_secrets.py"
SECRETS = ("PARLEY_JWT_SECRET", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
# The third-party images: official by default, replaceable (a registry mirror, or compose-check's
# local stand-ins). Documented in the file's header rather than in .env.example, so that a .env
# made by `make secrets` never pins an image.
IMAGES = {
    "postgres": ("PARLEY_POSTGRES_IMAGE", "docker.io/library/postgres:17.12-bookworm"),
    "redis": ("PARLEY_REDIS_IMAGE", "docker.io/library/redis:7.4.11-bookworm"),
    "prometheus": ("PARLEY_PROMETHEUS_IMAGE", "docker.io/prom/prometheus:v3.5.0"),
    "jaeger": ("PARLEY_JAEGER_IMAGE", "docker.io/jaegertracing/jaeger:2.21.0"),
}
IMAGE_VARIABLES = {variable for variable, _ in IMAGES.values()}
COMPOSE_CHECK = REPO / "deploy" / "compose-check"
SETTINGS = {"user": UserSettings.from_env, "chat": ChatSettings.from_env}
READINESS = {"user": USER_SERVICE, "chat": CHAT_SERVICE}
# ${NAME}, ${NAME:-default}, ${NAME:?error} and the escaped $$.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}|\$\$")


class MissingVariable(Exception):
    """What `docker compose` stops with when a ${NAME:?error} variable is unset or empty."""


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with every variable replaced as `docker compose` does."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, form, argument = match.groups()
        given = env.get(name, "")
        if form == ":?" and not given:
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        return given or (argument if form == ":-" else "")

    return _VARIABLE.sub(replace, value)


def make_secrets(env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/make_secrets.py run for real, by a Python that sees only its standard library."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(MAKE_SECRETS), "--env", str(env),
         "--example", str(ENV_EXAMPLE), *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dot_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The .env that `make secrets` makes from .env.example."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    result = make_secrets(path)
    assert result.returncode == 0, result.stderr
    return _read_env(path)


@pytest.fixture(scope="module")
def compose(dot_env: dict[str, str]) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    resolved: dict[str, Any] = _interpolate(raw, dot_env)
    return resolved


def _component(service: dict[str, Any]) -> str | None:
    """ "user" or "chat" for a service running a Parley image (the SERVICE it is built with)."""
    build = service.get("build", {})
    if build.get("dockerfile", "Dockerfile") != "Dockerfile":
        return None
    component = build.get("args", {}).get("SERVICE")
    return str(component) if component else None


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


def test_the_compose_file_matches_the_compose_spec() -> None:
    tool = venv_tool("check-jsonschema")
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
    # Every image of the one Dockerfile, each from the repository root (the context it needs).
    built: dict[str, dict[str, Any]] = {}
    for build in images.values():
        path = Path(build["context"], build.get("dockerfile", "Dockerfile")).as_posix()
        if path == "Dockerfile":
            built[build["args"]["SERVICE"]] = build
    assert sorted(built) == sorted(image_services()), "nothing builds some SERVICE"
    assert all(build["context"] == "." for build in built.values())


def test_parley_services_get_only_settings_their_command_reads(compose: dict[str, Any]) -> None:
    reads = env_reads()
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
    uses = [m.groups() for m in _VARIABLE.finditer(text)
            if m.group(1) and m.group(1) not in IMAGE_VARIABLES]  # fmt: skip
    defaults = {name: argument for name, form, argument in uses if form == ":-"}
    required = {name for name, form, _ in uses if form == ":?"}
    example = _read_env(ENV_EXAMPLE)
    taken = set(defaults) | required
    assert taken == set(example), (
        f"only in docker-compose.yml: {sorted(taken - set(example))}; "
        f"only in .env.example: {sorted(set(example) - taken)}"
    )
    differing = {k: (defaults[k], example[k]) for k in defaults if defaults[k] != example[k]}
    assert not differing, f"compose default vs .env.example: {differing}"
    # A secret has no default anywhere: compose stops until `make secrets` has made it.
    assert required == set(SECRETS)
    assert not required & set(defaults), f"a default for {sorted(required & set(defaults))}"
    assert {name: example[name] for name in SECRETS} == dict.fromkeys(SECRETS, "")
    assert {name for name, form, _ in uses if not form} == set(), "use ${X:-default} or ${X:?}"
    leftover = re.sub(_VARIABLE, "", text)
    assert "$" not in leftover.replace("$${", ""), "an interpolation form this test cannot read"


def test_the_stack_refuses_to_start_without_the_secrets() -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for secret in SECRETS:
        env = {name: "made-by-make-secrets" for name in SECRETS} | {secret: ""}
        with pytest.raises(
            MissingVariable, match=f"{secret} is missing a value: run `make secrets`"
        ):
            _interpolate(raw, _read_env(ENV_EXAMPLE) | env)


def test_secrets_reach_the_services_and_stores(
    compose: dict[str, Any], dot_env: dict[str, str]
) -> None:
    services = compose["services"]
    password = dot_env["POSTGRES_PASSWORD"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name, (component, command, service) in _parley(compose).items():
        database = DatabaseSettings.from_env(Env(service["environment"]))
        assert url_password(database.url) == password, name
        if command != "serve":
            continue
        settings = SETTINGS[component](Env(service["environment"]))
        assert settings.auth.secret == dot_env["PARLEY_JWT_SECRET"], name
        if component == "chat":
            assert url_password(settings.redis_url) == dot_env["REDIS_PASSWORD"], name
            assert settings.redis_url.endswith("@redis:6379/0"), name


def test_redis_requires_the_password_without_showing_it(
    compose: dict[str, Any], dot_env: dict[str, str]
) -> None:
    redis = compose["services"]["redis"]
    password = dot_env["REDIS_PASSWORD"]
    assert redis["environment"] == {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    # The command holds the variable's name only: the shell reads the value at start.
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"] and password not in script
    assert "requirepass ${REDIS_PASSWORD}" in script
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "-e", "ping"]


def test_ports_are_published_on_loopback_unless_told_otherwise(compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    published = []
    for name, service in raw["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as HOST_IP:HOST_PORT:PORT"
            assert port.startswith("${PARLEY_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
        for port in compose["services"][name].get("ports", []):
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port}"
            published.append(name)
    # user, chat-1 and chat-2 (gRPC and metrics each), Prometheus and Jaeger's UI.
    assert sorted(published) == sorted(["user", "chat-1", "chat-2"] * 2 + ["prometheus", "jaeger"])
    everywhere = _interpolate(raw, _read_env(ENV_EXAMPLE) | dict.fromkeys(SECRETS, "x")
                              | {"PARLEY_BIND_ADDRESS": "0.0.0.0"})  # fmt: skip
    assert all(port.startswith("0.0.0.0:") for port in everywhere["services"]["user"]["ports"])


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


def test_prometheus_stores_exemplars(compose: dict[str, Any]) -> None:
    """The latency histogram's exemplars (trace ids) are kept only with exemplar storage."""
    prometheus = compose["services"]["prometheus"]
    command = prometheus["command"]
    assert "--enable-feature=exemplar-storage" in command
    # `command` replaces the image's arguments: the config must still be the mounted file.
    mounted = {v.split(":")[1] for v in prometheus["volumes"]}
    (config,) = [a.split("=", 1)[1] for a in command if a.startswith("--config.file=")]
    assert config in mounted
    assert "--storage.tsdb.path=/prometheus" in command


# What every serving Parley service gets, so that tracing is off unless OTEL_TRACES_EXPORTER
# says otlp, and then goes to Jaeger's OTLP gRPC port.
TRACING_ENV = {
    "OTEL_TRACES_EXPORTER": "${OTEL_TRACES_EXPORTER:-none}",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "${OTEL_EXPORTER_OTLP_ENDPOINT:-http://jaeger:4317}",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "${OTEL_EXPORTER_OTLP_PROTOCOL:-grpc}",
    "OTEL_TRACES_SAMPLER": "${OTEL_TRACES_SAMPLER:-parentbased_always_on}",
    "OTEL_TRACES_SAMPLER_ARG": "${OTEL_TRACES_SAMPLER_ARG:-1}",
    "PARLEY_ACCESS_LOG_SAMPLE": "${PARLEY_ACCESS_LOG_SAMPLE:-1}",
}
OTLP_PORTS = {"grpc": 4317, "http/protobuf": 4318}


def test_jaeger_runs_only_in_the_tracing_profile() -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = raw["services"]
    tracing = {name for name, s in services.items() if "tracing" in s.get("profiles", [])}
    assert tracing == {"jaeger"}
    assert services["jaeger"]["profiles"] == ["tracing"]
    # An exact release, never a moving tag such as latest or 2.
    official = IMAGES["jaeger"][1]
    assert re.fullmatch(r"docker\.io/jaegertracing/jaeger:\d+\.\d+\.\d+", official)
    # Nothing of the default profile waits for it, so the stack starts without it.
    for name, service in services.items():
        assert "jaeger" not in service.get("depends_on", {}), name
    # It receives OTLP on both ports inside the network and shows its UI on 16686.
    jaeger = services["jaeger"]
    assert {int(p) for p in jaeger["expose"]} == set(OTLP_PORTS.values())
    assert [p.rsplit(":", 1)[1] for p in jaeger["ports"]] == ["16686"]
    # Hardened as the Parley services are (its image runs as a non-root user).
    assert jaeger["read_only"] is True and jaeger["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in jaeger["security_opt"]


def test_every_serving_service_is_wired_to_jaeger_and_tracing_is_off_by_default(
    compose: dict[str, Any],
) -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = _parley(compose)
    for name, (_, command, service) in services.items():
        environment = raw["services"][name]["environment"]
        if command == "migrate":  # `migrate` is not traced
            assert not {k for k in environment if k.startswith("OTEL_")}, name
            continue
        assert {k: environment.get(k) for k in TRACING_ENV} == TRACING_ENV, name
        # Without OTEL_TRACES_EXPORTER=otlp (the .env of `make secrets`, and no profile),
        # no service tries to export to a jaeger host that is not there.
        settings = TracingSettings.from_env(Env(service["environment"]))
        assert service["environment"]["OTEL_TRACES_EXPORTER"] == "none", name
        assert not settings.enabled, name


@pytest.mark.parametrize("protocol", sorted(OTLP_PORTS))
def test_with_the_exporter_on_the_services_send_to_jaeger(
    dot_env: dict[str, str], protocol: str
) -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    turned_on = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    if protocol != "grpc":
        turned_on["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://jaeger:{OTLP_PORTS[protocol]}"
    compose = _interpolate(raw, dot_env | turned_on)
    jaeger = compose["services"]["jaeger"]
    serving = [s for _, command, s in _parley(compose).values() if command == "serve"]
    assert serving
    for service in serving:
        settings = TracingSettings.from_env(Env(service["environment"]))
        assert settings.enabled and settings.protocol == protocol
        assert settings.endpoint is not None
        host, port = settings.endpoint.removeprefix("http://").split(":")
        assert host == "jaeger" and int(port) == OTLP_PORTS[protocol]
        assert port in jaeger["expose"]


def test_the_redis_command_requires_the_password_when_run(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    redis = compose["services"]["redis"]
    password = redis["environment"]["REDIS_PASSWORD"]
    with run_redis_command(redis["command"], redis["environment"], tmp_path) as run:
        assert password not in run.cmdline()
        assert "NOAUTH" in run.cli("ping", REDISCLI_AUTH=None).stdout
        # The health check as compose runs it, in the container's environment.
        program, *args = redis["healthcheck"]["test"][1:]
        assert program == "redis-cli"
        assert run.cli(*args).stdout.strip() == "PONG"
        assert run.cli(*args, REDISCLI_AUTH="not-" + password).returncode != 0
        assert run.cli("-e", "ping", REDISCLI_AUTH=None).returncode != 0


def test_the_redis_command_refuses_a_password_unfit_for_a_url(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    redis = compose["services"]["redis"]
    env, _ = redis_command_env(tmp_path)
    unfit = "with space#" + secrets.token_urlsafe(8)
    bad = {**redis["environment"], "REDIS_PASSWORD": unfit}
    result = subprocess.run(
        redis["command"], env={**env, **bad}, capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 1
    assert "REDIS_PASSWORD: use only A-Z a-z 0-9 . _ ~ -" in result.stderr


def test_postgres_is_healthy_only_when_it_answers_over_tcp(compose: dict[str, Any]) -> None:
    """On its first start the official image runs initdb and its init scripts on a server
    that listens on the Unix socket only; pg_isready without -h probes that socket and passes
    before the services, which connect over TCP, can reach it."""
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2, test
    words = test[1].split()
    assert words[0] == "pg_isready", test
    assert "-h" in words and words[words.index("-h") + 1] == "127.0.0.1", test
    assert words[words.index("-U") + 1] == "${POSTGRES_USER}", test
    assert words[words.index("-d") + 1] == "${POSTGRES_DB}", test


def test_third_party_images_default_to_the_official_ones(dot_env: dict[str, str]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for service, (variable, official) in IMAGES.items():
        assert raw["services"][service]["image"] == f"${{{variable}:-{official}}}", service
        assert _interpolate(raw, dot_env)["services"][service]["image"] == official, service
        mirror = f"mirror.example:5000/{official.split('/', 1)[1]}"
        replaced = _interpolate(raw, dot_env | {variable: mirror})
        assert replaced["services"][service]["image"] == mirror, service
    header = COMPOSE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    assert all(variable in header for variable in IMAGE_VARIABLES), "document them up top"
    assert not IMAGE_VARIABLES & set(_read_env(ENV_EXAMPLE)), "keep images out of .env"
    # Every image the default profile pulls is one of these (the rest are Parley's, built).
    pulled = {name for name, service in raw["services"].items()
              if "build" not in service and not service.get("profiles")}  # fmt: skip
    assert pulled <= set(IMAGES)


def test_compose_check_stands_in_for_each_pulled_image() -> None:
    """compose-check replaces the images that cannot be pulled on CI through these variables."""
    script = (COMPOSE_CHECK / "compose_check.py").read_text(encoding="utf-8")
    for service in ("postgres", "redis"):
        variable = IMAGES[service][0]
        assert f'"{variable}"' in script, f"compose-check does not set {variable}"
        folder = COMPOSE_CHECK / "standins" / service
        assert (folder / "Dockerfile").is_file() and (folder / "docker-entrypoint.sh").is_file()
        assert "STAND-IN" in (folder / "Dockerfile").read_text(encoding="utf-8")


def test_health_checks_run_a_python_the_images_have(compose: dict[str, Any]) -> None:
    """The exec-form checks run `python`: the venv's, first on the images' PATH."""
    for name, (component, _, service) in _serving(compose).items():
        assert service["healthcheck"]["test"][:3] == ["CMD", "python", "-c"], name
        image = [i for stage in service_image(component) for i in stage.instructions]
        assert ("COPY", "--from=build /app/.venv /app/.venv") in image, name
        path = [rest for word, rest in image if word == "ENV" and rest.startswith("PATH=")]
        assert path and path[-1].startswith("PATH=/app/.venv/bin:"), name
