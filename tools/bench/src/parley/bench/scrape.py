"""What a service's Prometheus endpoint says: its samples, and one metric's total."""

from __future__ import annotations

import urllib.request

__all__ = ["metric_samples", "metric_total"]


def metric_samples(metrics_address: str) -> dict[str, float]:
    """The samples of a metrics endpoint, by their name with labels."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include every one of `labels`."""
    wanted = [f'{label}="{value}"' for label, value in labels.items()]
    total = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(pair in rest for pair in wanted):
            total += value
    return total
