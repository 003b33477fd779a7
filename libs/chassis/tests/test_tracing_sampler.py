"""Parley's sampling rules (parley.chassis._otel_sdk._RequestsOnly), decided without a
process: what a caller's trace id, a local parent and a delivery's links can and cannot do."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import sampling

from parley.chassis import ConfigError, Env
from parley.chassis._otel_sdk import _RequestsOnly, _sampler
from parley.chassis.tracing import TracingSettings

SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
# Low 64 bits zero: the trace id every ratio sampler samples.
FAVOURED_TRACE_ID = 0xABCDEF << 64


def rules(sampler: str, ratio: float = 1.0) -> _RequestsOnly:
    settings = TracingSettings(True, sampler=sampler, ratio=ratio)
    return _RequestsOnly(_sampler(sampler, ratio), settings)


def parent(*, remote: bool, sampled: bool, trace_id: int = FAVOURED_TRACE_ID) -> object:
    context = trace.SpanContext(
        trace_id, 0x1234, is_remote=remote, trace_flags=SAMPLED if sampled else trace.TraceFlags(0)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(context))


def decide(rule: _RequestsOnly, kind: trace.SpanKind, context: object = None, links=None) -> bool:
    result = rule.should_sample(context, FAVOURED_TRACE_ID, "span", kind, links=links)
    return result.decision is sampling.Decision.RECORD_AND_SAMPLE


def test_a_caller_cannot_pick_a_trace_id_that_traceidratio_always_samples() -> None:
    rule = rules("traceidratio", 0.001)
    caller = parent(remote=True, sampled=True)
    decisions = [decide(rule, trace.SpanKind.SERVER, caller) for _ in range(2000)]
    # Binomial(2000, 0.001): more than 15 has a chance below 1e-9.
    assert sum(decisions) <= 15


def test_children_follow_their_parent_in_this_process() -> None:
    rule = rules("traceidratio", 0.001)
    for sampled in (True, False):
        local = parent(remote=False, sampled=sampled)
        assert decide(rule, trace.SpanKind.CLIENT, local) is sampled
        assert decide(rule, trace.SpanKind.INTERNAL, local) is sampled


def test_background_roots_are_never_sampled() -> None:
    rule = rules("always_on")
    assert not decide(rule, trace.SpanKind.CLIENT)
    assert not decide(rule, trace.SpanKind.INTERNAL)
    assert decide(rule, trace.SpanKind.SERVER)
    assert decide(rule, trace.SpanKind.PRODUCER)


def link(sampled: bool) -> trace.Link:
    context = trace.SpanContext(
        7 << 64, 0x99, is_remote=True, trace_flags=SAMPLED if sampled else trace.TraceFlags(0)
    )
    return trace.Link(context)


def test_a_delivery_is_sampled_as_its_send_was_with_a_parent_based_sampler() -> None:
    rule = rules("parentbased_always_on")
    assert decide(rule, trace.SpanKind.CONSUMER, links=[link(True)])
    assert not decide(rule, trace.SpanKind.CONSUMER, links=[link(False)])


def test_a_forged_sampled_link_cannot_force_a_delivery_span() -> None:
    rule = rules("always_off")
    assert not decide(rule, trace.SpanKind.CONSUMER, links=[link(True)])


def test_an_endpoint_with_credentials_is_refused() -> None:
    env = Env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:secret@collector:4317"})
    with pytest.raises(ConfigError) as refused:
        TracingSettings.from_env(env)
    assert "OTEL_EXPORTER_OTLP_HEADERS" in str(refused.value)
    assert "secret" not in str(refused.value)
