"""The hot-room row's reading of what stores wait for in Postgres."""

from __future__ import annotations

import pytest

from parley.bench.hotroom import summarize_waits


def test_summarizes_what_stores_waited_for() -> None:
    waits = summarize_waits(
        {
            "Lock:transactionid": 50,
            "Lock:tuple": 10,
            "IO:WALSync": 20,
            "CPU": 15,
            "LWLock:LockManager": 5,
        },
        samples=20,
    )
    assert waits["active"] == pytest.approx(5.0)  # 100 stores seen over 20 samples
    assert waits["lock"] == pytest.approx(0.6)
    assert waits["wal"] == pytest.approx(0.2)
    assert waits["cpu"] == pytest.approx(0.15)
    assert waits["other"] == pytest.approx(0.05)


def test_nothing_sampled_is_all_zeros() -> None:
    assert set(summarize_waits({}, samples=0).values()) == {0.0}
    assert set(summarize_waits({"CPU": 3}, samples=0).values()) == {0.0}
