"""Reading a server's Prometheus metrics."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["sample_key", "scrape_metrics"]


def sample_key(name: str, **labels: str) -> str:
    """How `scrape_metrics` names a sample: `name` or `name{a="x",b="y"}` (labels sorted)."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Every sample served on http://host:port/metrics, keyed as `sample_key` names it."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample_key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
