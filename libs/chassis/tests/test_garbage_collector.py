"""Once serving, a service's start-up objects are frozen out of the collector's reach and
young collections run less often (see settle_garbage_collector)."""

from __future__ import annotations

import gc

from parley.chassis.server import GC_YOUNG_THRESHOLD, settle_garbage_collector


def test_settling_freezes_what_exists_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > frozen
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
