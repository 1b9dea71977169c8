"""Giving up on a request that has waited far past its deadline: a bounded answer time.

FlowPrefill demotes a late request behind every feasible one (``priority.py``) and never drops
it. Under a stretch of full load that wait has no bound: feasible work keeps arriving, and a
late request - queued, or inside a unit that was paused and then turned late - is served only
once the load stops. Live, on two cores at 2.7 req/s, loose-class requests that had started
before their deadline were paused, turned late and got their first token 100-150 s after
arrival (docs/results/ttft_path_front_end_nice*.json, their timelines). Their clients had
long given up; the server still owed them the work.

With ``PolicyConfig.late_give_up_factor`` k set, a request that still has no first token
``k x its TTFT target`` after its deadline is refused instead (``Reject``: HTTP 429 with
Retry-After, like an admission refusal, with a reason that says how long it waited). What can
be given up is work that is not computing now:

- a WAITING request (queued, no progress);
- a paused unit once EVERY member is past its give-up time: the unit is discarded (its
  worker frees the paused state) and each live member refused. A member whose neighbours in
  the unit still have time waits with them: resuming the unit serves it at no extra cost.

A request in a running or pausing unit is re-checked at the next event, and so is a chunked
request between chunks (its partial KV sits on a worker; it is next in line there). The
check runs on every event before the policy schedules, from a heap ordered by give-up time,
so an event pays only for the requests that have come due.

None (the default) keeps the paper's behaviour: late requests wait for as long as it takes.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from .records import UnitState
from .request import RequestStatus

if TYPE_CHECKING:
    from .events import Decision
    from .records import RequestRecord, UnitRecord

_WAITING = RequestStatus.WAITING
_PAUSED = RequestStatus.PAUSED


class GiveUp:
    """Mixed into ``Policy`` (policy.py)."""

    def _init_give_up(self, factor: float | None) -> None:
        self._give_up_factor = factor
        # (give-up time, arrival order, request id); stale entries are skipped when popped.
        self._give_up_heap: list[tuple[float, int, str]] = []
        self.counters["given_up"] = 0  # type: ignore[attr-defined]

    def give_up_s(self, rec: RequestRecord) -> float | None:
        """When ``rec`` is given up if it still has no first token (policy seconds), or None."""
        if self._give_up_factor is None:
            return None
        return rec.deadline_s + self._give_up_factor * rec.ttft_slo_s

    def _watch_give_up(self, rec: RequestRecord) -> None:
        """Track an admitted request (called once its deadline is final)."""
        when = self.give_up_s(rec)
        if when is not None:
            heapq.heappush(self._give_up_heap, (when, rec.tiebreak[1], rec.request_id))

    def _give_up_overdue(self, now: float, out: list[Decision]) -> None:
        """Refuse every request past its give-up time that is not computing now."""
        heap = self._give_up_heap
        if not heap or heap[0][0] > now:
            return
        requests = self.requests  # type: ignore[attr-defined]
        recheck: list[tuple[float, int, str]] = []
        paused_units: dict[int, UnitRecord] = {}
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            rec = requests.get(entry[2])
            if rec is None or rec.status.is_terminal:
                continue
            if rec.status is _WAITING:
                self._refuse_late(rec, now, out)
            elif rec.status is _PAUSED and rec.unit_id is not None:
                u = self.units[rec.unit_id]  # type: ignore[attr-defined]
                if u.state is UnitState.PAUSED:
                    paused_units[rec.unit_id] = u
                recheck.append(entry)
            else:  # computing, or a chunked request's partial KV waits for its next chunk
                recheck.append(entry)
        for u in paused_units.values():
            members = [requests[i.request_id] for i in u.unit.items]
            if all(m.status.is_terminal or self.give_up_s(m) <= now for m in members):
                # Refused first, so that the discard finds no live member to re-queue.
                for m in members:
                    if not m.status.is_terminal:
                        self._refuse_late(m, now, out)
                out.append(self._discard(u))  # type: ignore[attr-defined]
        for entry in recheck:
            rec = requests[entry[2]]
            if not rec.status.is_terminal:
                heapq.heappush(heap, entry)
        # Pushed back due: the next event looks at them again (not this one: the loop is over).

    def _refuse_late(self, rec: RequestRecord, now: float, out: list[Decision]) -> None:
        self.counters["given_up"] += 1  # type: ignore[attr-defined]
        waited = now - rec.arrival_s
        reason = (
            f"gave up after {waited:.1f} s without a first token: "
            f"{self._give_up_factor:g} x its {rec.ttft_slo_s:g} s TTFT target past "
            "its deadline (the server is overloaded; policy.late_give_up_factor)"
        )
        self._refuse_admitted(rec, reason, out)  # type: ignore[attr-defined]
