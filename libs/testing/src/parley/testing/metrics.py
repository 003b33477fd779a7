"""Reading a server's Prometheus metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "POOL_GAUGES",
    "Scrape",
    "metrics_text",
    "pool_stats",
    "sample_key",
    "scrape",
    "scrape_metrics",
]


def sample_key(name: str, **labels: str) -> str:
    """How `scrape_metrics` names a sample: `name` or `name{a="x",b="y"}` (labels sorted)."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def metrics_text(port: int, host: str = "127.0.0.1") -> str:
    """What http://host:port/metrics serves."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Every sample served on http://host:port/metrics, keyed as `sample_key` names it."""
    return {
        sample_key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(metrics_text(port, host))
        for sample in family.samples
    }


class Scrape:
    """One scrape of a /metrics endpoint: its `text`, and its metric `families` by name,
    parsed with prometheus_client's parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str, **labels: str) -> list[Any]:
        """Samples called `name` (a sample name, such as x_total or x_bucket) that carry
        these labels (and maybe others)."""
        return [
            sample
            for family in self.families.values()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample called `name` whose labels are exactly these."""
        matches = [s for s in self.samples(name, **labels) if set(s.labels) == set(labels)]
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
        return float(matches[0].value)


async def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """GETs http://host:port/metrics, without blocking the event loop, and parses it."""
    return Scrape(await asyncio.to_thread(metrics_text, port, host))


# The gauges of a service's Postgres pool (parley.chassis.Database), by short name.
POOL_GAUGES = {
    "size": "parley_db_pool_connections",
    "idle": "parley_db_pool_idle_connections",
    "waiting": "parley_db_pool_waiting_requests",
    "requests": "parley_db_pool_requests_total",
}


def pool_stats(registry: CollectorRegistry) -> dict[str, float]:
    """The Postgres pool gauges in a running server's metrics registry (e.g. an in-process
    app's `app.metrics.registry`), keyed as POOL_GAUGES names them; 0 where absent."""
    return {key: registry.get_sample_value(name) or 0.0 for key, name in POOL_GAUGES.items()}
