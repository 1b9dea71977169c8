"""One-hop preemption: the unit that replaces a preempted one travels with the preemption.

Without it a preemption costs three trips between scheduler and worker: the preempt, the
worker's "paused" answer, and a new run call, decided only once that answer is in. With
``PolicyConfig.handover = "one_hop"`` the policy decides what the worker runs next when it
decides to preempt, and says both at once: ``Preempt`` and a ``RunUnit`` for the same (now
PAUSING) worker. The worker queues that unit behind the one it is stopping and starts it at
the checkpoint, with no further call; its "paused" (or "completed", if it finished first)
report travels back on its own and only updates the books.

Bookkeeping: the queued unit is ``WorkerRecord.next``; its requests are RUNNING from the
decision on (they are committed to that worker). When the worker's running unit pauses or
completes, ``_running_ended`` makes ``next`` the running unit, timed from that event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .events import RunUnit
from .records import UnitState, WorkerState

if TYPE_CHECKING:
    from .events import WorkItem
    from .kv_memory import UnitRoom
    from .records import UnitRecord, WorkerRecord


class Handover:
    """Mixed into ``Policy`` (policy.py)."""

    def _queue_next(
        self, w: WorkerRecord, items: list[WorkItem], now: float, room: UnitRoom | None = None
    ) -> RunUnit:
        """Commit ``items`` as the unit ``w`` runs once its pausing unit stops (``room``: what
        they took of ``w``'s KV budget)."""
        assert w.state is WorkerState.PAUSING and w.next is None
        u = self._new_unit(w, items, now, room)  # type: ignore[attr-defined]
        w.next = u
        return RunUnit(u.unit)

    def _running_ended(self, w: WorkerRecord, u: UnitRecord, now: float) -> None:
        """``u`` stopped running on ``w`` (paused or completed): ``w`` takes up its queued
        unit, or goes idle.

        The queued unit's own report may come first: the worker answers each call on its own
        thread, so a short queued unit's "completed" can overtake the "paused" of the unit it
        replaced (seen live on 2 busy cores). The worker runs one unit at a time, so that unit
        has stopped too: ``w`` keeps waiting for its report, with nothing queued. Promoting the
        finished unit to running then instead would leave ``w`` "running" it forever.
        """
        if w.running is not u:
            if w.next is u:
                w.next = None
                self.counters["queued_reported_first"] += 1  # type: ignore[attr-defined]
            return
        nxt = w.next
        if nxt is None:
            w.running = None
            w.state = WorkerState.IDLE
            return
        w.next = None
        nxt.state = UnitState.RUNNING
        nxt.started_at_s = now
        w.running = nxt
        w.state = WorkerState.RUNNING
