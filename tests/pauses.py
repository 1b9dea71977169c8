"""Holding a prefill unit at its first checkpoint, for tests of what control threads do to a
unit mid-prefill (pause, discard, eviction) on a machine of any speed."""

from __future__ import annotations

import threading

import pytest

from flowprefill_ray.runtime import prefill_units


@pytest.fixture
def hold_at_first_checkpoint(monkeypatch):
    """``hold(unit_id)`` -> an event set when that unit reaches its first checkpoint; the unit
    then waits there until a pause is requested, so a control thread always finds it
    mid-prefill (never not yet started, never already finished), however busy the machine."""
    reached: dict[int, threading.Event] = {}
    should_pause = prefill_units.WorkUnit.should_pause

    def gated(unit) -> bool:
        event = reached.get(unit.unit_id)
        if event is not None and not event.is_set():
            event.set()
            assert unit.pause.wait(60), "no pause request reached the held unit"
        return should_pause(unit)

    monkeypatch.setattr(prefill_units.WorkUnit, "should_pause", gated)
    return lambda unit_id: reached.setdefault(unit_id, threading.Event())
