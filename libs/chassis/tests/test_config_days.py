"""Durations in days (`30d`), for settings measured in days such as chat history retention."""

from __future__ import annotations

import pytest

from parley.chassis import ConfigError, Env


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1d", 86400.0), ("30d", 30 * 86400.0), ("0.5d", 43200.0), (" 2 d ", 172800.0), ("0d", 0.0)],
)
def test_days(text: str, seconds: float) -> None:
    assert Env({"D": text}).seconds("D", 99.0, maximum=3650 * 86400) == pytest.approx(seconds)


def test_days_count_against_the_maximum() -> None:
    # The default maximum is one day: a day passes, a day and a bit does not.
    assert Env({"D": "1d"}).seconds("D", 1.0) == 86400.0
    with pytest.raises(ConfigError) as info:
        Env({"D": "1.5d"}).seconds("D", 1.0)
    assert "between" in str(info.value) and "'1.5d'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["1dd", "d", "1 day", "1D", "-1d"])
def test_bad_days(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Env({"D": text}).seconds("D", 1.0, maximum=3650 * 86400)
    assert "duration" in str(info.value)
