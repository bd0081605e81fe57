"""reaas_server.memory.freeze_startup_heap: the start-up heap leaves the collector's full passes, later garbage does
not (a frozen heap must not become a leak)."""

from __future__ import annotations

import gc
import weakref

import pytest

from reaas_server.memory import freeze_startup_heap


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_startup_objects_are_frozen_and_later_cycles_are_still_collected(unfrozen):
    class Node:
        pass

    assert freeze_startup_heap() > 0 and gc.get_freeze_count() > 0
    later = Node()
    later.self = later  # a reference cycle made after start-up
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None
