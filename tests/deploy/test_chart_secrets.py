"""The chart's in-chart Redis requires a password that only Secrets hold: generated into the
chart's Secret, or read from redis.auth.existingSecret (or secret.existingSecret). Chat's
PARLEY_REDIS_URL carries it, redis-server never sees it as an argument, and the probes log
in. The in-chart Postgres password is generated too. The Redis container's command is also
run here, with the password the chart generated."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from parley.chassis import ConfigError, DatabaseSettings, Env
from parley.chassis.sample_secrets import is_sample_secret, url_password

from .helm import CHART, NAMESPACE, RELEASE, by_component, by_kind, pod_container, render, run_helm
from .redis_command import redis_command_env, run_redis_command

URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
HOST = "parley-redis.parley.svc.cluster.local"

# values file, extra arguments -> the (Secret name, key) the password must come from.
VARIANTS: dict[str, tuple[str, tuple[str, ...], tuple[str, str]]] = {
    "generated": ("kind-values.yaml", (), ("parley", "REDIS_PASSWORD")),
    "redis.auth.existingSecret": ("existing-secret-values.yaml", (), ("parley-redis", "password")),
    "secret.existingSecret": (
        "kind-values.yaml",
        ("--set", "secret.existingSecret=mine", "--set", "secret.keys.redisPassword=redis"),
        ("mine", "redis"),
    ),
}


def render_variant(helm: str, variant: str) -> list[dict[str, Any]]:
    values, extra, _ = VARIANTS[variant]
    manifests: list[dict[str, Any]] = render(helm, CHART / "ci" / values, "", *extra)
    return manifests


def pod(manifests: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (workload,) = by_component(manifests, "Deployment", component)
    return dict(workload["spec"]["template"]["spec"])


def secret_data(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (secret,) = by_kind(manifests, "Secret")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def ref(entry: dict[str, Any]) -> tuple[str, str]:
    assert "value" not in entry, f"{entry['name']} has a plain value"
    key_ref = entry["valueFrom"]["secretKeyRef"]
    return key_ref["name"], key_ref["key"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_redis_requires_a_password_that_comes_from_a_secret(helm: str, variant: str) -> None:
    manifests = render_variant(helm, variant)
    expected = VARIANTS[variant][2]
    container = pod_container(pod(manifests, "redis"), "redis")
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    assert ref(env["REDIS_PASSWORD"]) == ref(env["REDISCLI_AUTH"]) == expected
    # requirepass comes from the variable, through stdin: no argument holds a password.
    assert "command" not in container
    shell, flag, script = container["args"]
    assert (shell, flag) == ("sh", "-c")
    assert "requirepass $REDIS_PASSWORD" in script and "redis-server -" in script
    assert "--requirepass" not in script
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["redis-cli", "-e", "ping"], probe


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chat_dials_redis_with_the_password(helm: str, variant: str) -> None:
    manifests = render_variant(helm, variant)
    chat = pod_container(pod(manifests, "chat"), "chat")
    names = [e["name"] for e in chat["env"]]
    env = {e["name"]: e for e in chat["env"]}
    assert ref(env["REDIS_PASSWORD"]) == VARIANTS[variant][2]
    # The kubelet fills in $(REDIS_PASSWORD), which must be defined before.
    assert env["PARLEY_REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{HOST}:6379/0"
    assert names.index("REDIS_PASSWORD") < names.index("PARLEY_REDIS_URL")


def test_the_generated_password_is_random_and_kept_in_the_chart_secret(helm: str) -> None:
    data = secret_data(render_variant(helm, "generated"))
    password = data["REDIS_PASSWORD"]
    assert len(password) >= 32 and URL_SAFE.fullmatch(password)
    assert not is_sample_secret(password)
    # Without the in-chart Redis the Secret holds a URL; with it, chat builds the URL itself.
    assert "PARLEY_REDIS_URL" not in data
    # Generated at each install (on upgrade it is read back from the release's Secret).
    result = run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace",
        NAMESPACE, "--values", str(CHART / "ci" / "kind-values.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    again = secret_data([m for m in yaml.safe_load_all(result.stdout) if m])
    assert again["REDIS_PASSWORD"] != password


@pytest.mark.parametrize("variant", ["redis.auth.existingSecret", "secret.existingSecret"])
def test_no_manifest_holds_a_password_with_existing_secrets(helm: str, variant: str) -> None:
    manifests = render_variant(helm, variant)
    assert by_kind(manifests, "Secret") == []  # the chart makes none
    text = yaml.safe_dump_all(manifests)
    assert not re.search(r"redis://:[^$@\s]+@", text)
    assert not re.search(r"requirepass +[^$\s]", text)


def test_the_in_chart_postgres_password_is_generated(helm: str) -> None:
    manifests = render_variant(helm, "generated")
    data = secret_data(manifests)
    password = data["POSTGRES_PASSWORD"]
    assert len(password) >= 32 and URL_SAFE.fullmatch(password)
    assert not is_sample_secret(password)
    assert url_password(data["PARLEY_DATABASE_URL"]) == password
    (statefulset,) = by_component(manifests, "StatefulSet", "postgresql")
    container = pod_container(statefulset["spec"]["template"]["spec"], "postgres")
    env = {e["name"]: e for e in container["env"]}
    assert ref(env["POSTGRES_PASSWORD"]) == ("parley", "POSTGRES_PASSWORD")
    # A published password set by hand is refused by the services.
    chosen = render(helm, CHART / "ci" / "kind-values.yaml", "",
                           "--set", "postgresql.password=parley")  # fmt: skip
    url = secret_data(chosen)["PARLEY_DATABASE_URL"]
    with pytest.raises(ConfigError, match="sample value"):
        DatabaseSettings.from_env(Env({"PARLEY_DATABASE_URL": url}))


def test_the_redis_container_requires_the_password_when_run(helm4: str, tmp_path: Path) -> None:
    manifests = render_variant(helm4, "generated")
    password = secret_data(manifests)["REDIS_PASSWORD"]
    container = pod_container(pod(manifests, "redis"), "redis")
    env = {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    with run_redis_command(container["args"], env, tmp_path) as run:
        assert password not in run.cmdline()
        assert "NOAUTH" in run.cli("ping", REDISCLI_AUTH=None).stdout
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            program, *args = container[probe]["exec"]["command"]
            assert program == "redis-cli"
            assert run.cli(*args).stdout.strip() == "PONG", probe
            assert run.cli(*args, REDISCLI_AUTH=password[::-1]).returncode != 0, probe
        # Chat's URL, as the kubelet fills it in, pointed at this server.
        chat = pod_container(pod(manifests, "chat"), "chat")
        (url,) = [e["value"] for e in chat["env"] if e["name"] == "PARLEY_REDIS_URL"]
        url = url.replace("$(REDIS_PASSWORD)", password).replace(
            f"{HOST}:6379", f"127.0.0.1:{run.port}"
        )
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            assert client.ping()
        with (
            redis.Redis.from_url(url.replace(password, password[::-1]), socket_timeout=5) as client,
            pytest.raises(redis.AuthenticationError),
        ):
            client.ping()


def test_the_redis_container_refuses_a_password_unfit_for_a_url(helm4: str, tmp_path: Path) -> None:
    manifests = render_variant(helm4, "generated")
    container = pod_container(pod(manifests, "redis"), "redis")
    env, _ = redis_command_env(tmp_path)
    for bad in ("", "with space", "p@ss", "a%2Fb"):
        result = subprocess.run(
            container["args"], env={**env, "REDIS_PASSWORD": bad}, capture_output=True,
            text=True, timeout=10,
        )  # fmt: skip
        assert result.returncode == 1, bad
        assert "REDIS_PASSWORD: use 1 or more of A-Z a-z 0-9 . _ ~ -" in result.stderr
