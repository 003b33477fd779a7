"""The chat fan-out client against the bare broadcast baseline: both phases, every delivery."""

from __future__ import annotations

from parley.bench.baseline import BROADCAST_METHOD, start_broadcast_server
from parley.bench.chat import ChatSetup, run_fan_out
from parley.bench.plan import SMOKE


def test_fan_out_counts_deliveries_and_latencies() -> None:
    plan = SMOKE.with_overrides(chat_streams=6, duration=0.5, warm_up=0.2, processes=2)
    with start_broadcast_server() as server:
        setup = ChatSetup(
            addresses=(server.address,),
            method=BROADCAST_METHOD,
            listener_metadata=(),
            sender_metadata=((), ()),
        )
        result = run_fan_out(setup, plan)

    assert result.streams == 6 and result.senders == 2
    assert result.saturated_messages > 0
    # Every message reaches every listener: deliveries are about streams x messages.
    assert result.saturated_deliveries > 0
    assert result.load_deliveries > 0
    assert result.missing == 0
    assert result.stream_errors == {}
    assert 0 < result.p50 <= result.p99
    assert result.other_p50 == 0  # one server: every listener is on the sender's "replica"
