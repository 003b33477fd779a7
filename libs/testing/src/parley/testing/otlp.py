"""The OTLP trace receiver the tests export spans to (it lives in devstack, which the
benchmarks also use)."""

from parley.devstack.otlp import OtlpReceiver, ReceivedSpan

__all__ = ["OtlpReceiver", "ReceivedSpan"]
