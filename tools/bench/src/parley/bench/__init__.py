"""Parley's benchmark harness: `parley-bench`, behind `make bench` and `make bench-smoke`."""
