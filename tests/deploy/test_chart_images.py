"""Every image the chart runs renders from one template: repository:tag, or repository@digest
when image.digest is set; and the Postgres and Redis images are the same current patch
releases in the chart and in docker-compose.yml."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml

from .helm import CHART, render
from .tools import REPO

APP_VERSION = "0.1.0"
# The patch releases pinned (see the README's Deploy section for why these).
POSTGRES = "docker.io/library/postgres:17.12-bookworm"
REDIS = "docker.io/library/redis:7.4.11-bookworm"


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("Kind/name", pod spec) of every workload and bare Pod."""
    for manifest in manifests:
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield where, manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "Pod":
            yield where, manifest["spec"]


def images(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """The image of every container, by "Kind/name/container"."""
    return {
        f"{where}/{c['name']}": c["image"]
        for where, spec in pod_specs(manifests)
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    }


def values(name: str) -> dict[str, Any]:
    path = REPO / "deploy" / "helm" / "parley" / "ci" / name
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def test_images_render_by_tag_by_default(helm: str) -> None:
    kind = CHART / "ci" / "kind-values.yaml"
    found = images(render(helm, kind, "", "--set", "user.image.tag=", "--set", "chat.image.tag="))
    assert found, "no containers rendered"
    for where, image in found.items():
        if "/parley-postgresql/" in where:
            assert image == POSTGRES, where
        elif "/parley-redis/" in where:
            assert image == REDIS, where
        elif "migrate-chat" in where or where.startswith("Deployment/parley-chat/"):
            assert image == f"parley-chat:{APP_VERSION}", where
        else:  # user, its migrations and the helm test pod
            assert image == f"parley-user:{APP_VERSION}", where


def test_every_image_is_pinned_by_digest_when_digests_are_set(helm: str) -> None:
    variant = values("digests-values.yaml")
    user = "{repository}@{digest}".format(**variant["user"]["image"])
    chat = "{repository}@{digest}".format(**variant["chat"]["image"])
    postgres = "docker.io/library/postgres@" + variant["postgresql"]["image"]["digest"]
    redis = "docker.io/library/redis@" + variant["redis"]["image"]["digest"]
    path = CHART / "ci" / "digests-values.yaml"
    # Init containers run the migrations with the in-chart Postgres; "hook" makes the Job.
    for extra in ((), ("--set", "migrations.mode=hook")):
        found = images(render(helm, path, "", *extra))
        expected = {
            "Deployment/parley-user/user": user,
            "Deployment/parley-chat/chat": chat,
            "StatefulSet/parley-postgresql/postgres": postgres,
            "Deployment/parley-redis/redis": redis,
            "Pod/parley-test-grpc/test": user,
        }
        if extra:
            expected |= {
                "Job/parley-migrations/migrate-user": user,
                "Job/parley-migrations/migrate-chat": chat,
            }
        else:
            expected |= {
                "Deployment/parley-user/migrate": user,
                "Deployment/parley-chat/migrate": chat,
            }
        assert found == expected


def test_compose_and_chart_run_the_same_current_store_images() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    chart = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for service, key, pinned in (("postgres", "postgresql", POSTGRES), ("redis", "redis", REDIS)):
        image = chart[key]["image"]
        # ${PARLEY_POSTGRES_IMAGE:-<pinned>}: a mirror may replace it, the default is pinned.
        declared = compose["services"][service]["image"]
        match = re.fullmatch(r"\$\{PARLEY_[A-Z]+_IMAGE:-([^}]+)\}", declared)
        assert match and match.group(1) == pinned, (service, declared)
        assert f"{image['repository']}:{image['tag']}" == pinned
    # The October 2025 Lua fixes (CVE-2025-49844 and others) came with Redis 7.4.6.
    match = re.fullmatch(r".*:(\d+)\.(\d+)\.(\d+)-\w+", REDIS)
    assert match and tuple(map(int, match.groups())) >= (7, 4, 6)
