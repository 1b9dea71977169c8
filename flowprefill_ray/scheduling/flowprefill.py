"""FlowPrefill: slack-aware preemptive scheduling across all prefill workers.

On every event, with one ``now``: waiting requests and paused units are ranked by
``priority = sign(slack) / deadline`` (see ``priority.py``); a unit of several requests by its
most urgent member that can still make its deadline (``UnitRecord.due_s``), so one late member
does not demote the members batched with it. Then

1. every idle worker gets the best thing it can run: a paused unit it holds (resumed in place)
   or the best waiting request (started, with SLO-aware batching, see ``batching.py``);
   new work goes preferably to an idle worker with no paused work of its own;
2. if no worker is idle, the best waiting request may preempt the running unit that ranks
   lowest, when it outranks it and the preemption buys something: the newcomer is feasible
   and would otherwise miss its deadline (its slack is shorter than the time until a worker
   frees up), or the victim keeps non-negative slack after waiting for the newcomer. A unit
   that has run past its prediction, but by no more than the overrun one unit in ten has
   shown lately (``overrun_grace``), is taken as nearly done: it frees its worker after the
   rest of that band, and only a newcomer that would miss by waiting that long pauses it.
   (Without this, such a unit's predicted remaining is 0, its slack looks ample, and it was
   paused on its last operators for newcomers that could have waited; live, with a tight
   member already late, it then sat paused behind feasible work for 6-12 s.)

A paused unit resumes only on its own worker, when that worker is idle and the unit is the
best thing for it; it never preempts. (A running unit's slack stays constant while it runs as
predicted, so it only turns late by overrunning its prediction, and then how much work it has
left is unknown: preempting it on a guess is not worth the thrashing risk.)

Paused state costs memory. A worker that joined with a KV budget (``kv_memory.py``) never
holds more than its paused budget in paused and pausing units, nor more than its whole budget
in all: before its running unit is preempted, its lowest-ranked paused units are evicted
(``Discard``; their requests go back to the queue with no progress and the same deadlines, to
be recomputed later) until the unit fits beside the newcomer, and a unit that could not fit
even then is not preempted (the next victim is tried). A new unit on an idle worker evicts the
same way when its head does not fit; batch members join only within the free bytes.

Preemption is asynchronous: the worker is PAUSING until ``UnitPaused`` (or
``UnitCompleted``) arrives. With ``handover = "one_hop"`` (default) the unit that replaces the
victim is decided with the preemption and sent with it (``handover.py``): the worker switches
at its checkpoint without another call. With ``after_pause`` the worker is scheduled again
when the pause is reported. A long prompt is one unit
``[0, n)``; the worker runs it as ``long_chunk_tokens`` chunks back to back.
"""

from __future__ import annotations

from .batching import form_slo_batch
from .config import PolicyConfig
from .events import Decision, WorkItem
from .kv_memory import UnitRoom
from .policy import Policy
from .predictor import TTFTPredictor
from .priority import rank_key, slack_s
from .queues import SlackQueue
from .records import RequestRecord, UnitRecord, WorkerRecord, WorkerState
from .slo import SLOConfig

_IDLE = WorkerState.IDLE
_RUNNING = WorkerState.RUNNING
_PAUSING = WorkerState.PAUSING


class FlowPrefillPolicy(Policy):
    name = "flowprefill"
    preemptive = True
    can_overtake = True

    def __init__(
        self,
        config: PolicyConfig,
        predictor: TTFTPredictor,
        slo: SLOConfig | None = None,
    ) -> None:
        super().__init__(config, predictor, slo)
        self.queue = SlackQueue(predictor, config.token_bound, config.rescore_threshold)

    def _enqueue(self, rec: RequestRecord, now: float) -> None:
        self.queue.push(rec, now)

    def _demote(self, rec: RequestRecord) -> None:
        self.queue.demote(rec)

    # ------------------------------------------------------------------ ranking

    def _unit_rank(self, u: UnitRecord, now: float) -> tuple[tuple[int, float], tuple[int, int]]:
        # Ranked by the member that can still make its deadline (``UnitRecord.due_s``).
        return rank_key(*self.unit_slack_and_due_s(u, now)), u.tiebreak

    @staticmethod
    def _request_rank(
        rec: RequestRecord, feasible: bool
    ) -> tuple[tuple[int, float], tuple[int, int]]:
        key = (0, rec.deadline_s) if feasible else (1, -rec.deadline_s)
        return key, rec.tiebreak

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        idle = [w for w in self.workers.values() if w.state is _IDLE]
        if idle:
            self._fill_idle(idle, now, out)
        # Every worker busy: see whether waiting work should preempt (unless ablated).
        if not idle and self.config.preemption:
            self._preempt_for_waiting(now, out)
        return out

    def _fill_idle(self, idle: list[WorkerRecord], now: float, out: list[Decision]) -> None:
        """Give each idle worker its best paused unit or the best waiting request. ``idle``
        is emptied of the workers that got work. With prefix routing, a request may be left
        queued for a busy worker's cache (``route``); it is put back before returning."""
        deferred: list[RequestRecord] = []
        try:
            self._fill_idle_deferring(idle, now, out, deferred)
        finally:
            for rec in deferred:
                self.queue.unpop(rec)

    def _fill_idle_deferring(
        self,
        idle: list[WorkerRecord],
        now: float,
        out: list[Decision],
        deferred: list[RequestRecord],
    ) -> None:
        busy: dict[str, float] | None = None  # computed once, if routing needs it
        while idle:
            best_paused: UnitRecord | None = None
            best_paused_rank = None
            for w in idle:
                for u in w.paused.values():
                    r = self._unit_rank(u, now)
                    if best_paused_rank is None or r < best_paused_rank:
                        best_paused, best_paused_rank = u, r
            top = self.queue.peek(now)
            if best_paused is not None and (
                top is None or best_paused_rank <= self._request_rank(*top)
            ):
                # Ties go to the paused unit: part of its work is already done.
                worker = self.workers[best_paused.worker_id]
                out.append(self._resume(best_paused, now))
                idle.remove(worker)
                continue
            if top is None:
                return
            head = top[0]
            usual = self._worker_for_new_work(idle, now)
            worker = usual
            if self.prefix.enabled and head.request.prefix_hashes:
                if busy is None:
                    busy = self.busy_remaining_s(now)
                slack = self.queue.slack_s(head, now)
                worker = self.route(head, idle, usual, slack, busy, now)
                if worker is None and len(deferred) >= self.prefix.defer_scan_limit:
                    worker = usual
            popped = self.queue.pop(now)
            assert popped is head
            if worker is None:
                deferred.append(head)
                continue
            evicted: list[RequestRecord] = []
            room = self._room_for_head(worker, head, now, out, evicted)
            items = self._batch(head, worker, room, now)
            out.append(self._start_unit(worker, items, now, room))
            idle.remove(worker)
            for rec in evicted:  # queued after the batch, which must not take them back
                self._queue(rec, now)

    def _batch(
        self, head: RequestRecord, worker: WorkerRecord, room: UnitRoom, now: float
    ) -> list[WorkItem]:
        """The unit ``head`` leads on ``worker`` (SLO-aware batching within ``room``)."""
        return form_slo_batch(
            head,
            self.queue,
            self.predictor,
            self.config,
            room,
            now,
            self._uncached_on(worker.worker_id),
        )

    def _room_for_head(
        self,
        w: WorkerRecord,
        head: RequestRecord,
        now: float,
        out: list[Decision],
        evicted: list[RequestRecord],
    ) -> UnitRoom:
        """``w``'s free KV bytes with ``head`` taken. When the head does not fit, ``w``'s
        lowest-ranked paused units are evicted until it does (the head outranks them all, or
        one of them would have been resumed); a head that could not fit even then runs beyond
        the budget with nothing evicted."""
        item = WorkItem(head.request_id, head.prefilled_tokens, head.prompt_tokens)
        room = self.memory.room(w, self.requests)
        if room.free is not None and not room.fits(item):
            paused = sorted(w.paused.values(), key=lambda u: self._unit_rank(u, now), reverse=True)
            bytes_of = self.memory.unit_bytes
            if room.free + sum(bytes_of(u) for u in paused) >= room.need(item):
                for u in paused:
                    discard, requeue = self._evict(u)
                    out.append(discard)
                    evicted.extend(requeue)
                    room.free += bytes_of(u)
                    if room.fits(item):
                        break
        room.take(item, force=True)
        return room

    def _uncached_on(self, worker_id: str):
        """Tokens a request would compute on ``worker_id`` (its cache's prefix excluded)."""
        if not self.prefix.enabled:
            return lambda rec: rec.remaining_tokens

        def uncached(rec: RequestRecord) -> int:
            done = max(rec.prefilled_tokens, self.cached_on(worker_id, rec))
            return rec.prompt_tokens - done

        return uncached

    def _worker_for_new_work(self, idle: list[WorkerRecord], now: float) -> WorkerRecord:
        """An idle worker with no paused work, else the one whose best paused unit ranks
        lowest (it is the least likely to want its own worker back soon)."""
        chosen, chosen_rank = None, None
        for w in idle:
            if not w.paused:
                return w
            best = min(self._unit_rank(u, now) for u in w.paused.values())
            if chosen_rank is None or best > chosen_rank:
                chosen, chosen_rank = w, best
        assert chosen is not None
        return chosen

    def _preempt_for_waiting(self, now: float, out: list[Decision]) -> None:
        running = [w for w in self.workers.values() if w.state is _RUNNING]
        if not running:
            return
        # Victims, lowest-ranked first, with their slack, remaining compute and whether they
        # are in their overrun grace (below).
        band = self._overrun_band()
        late_band = self.late_band()
        victims = []
        for w in running:
            u = w.running
            assert u is not None
            predicted = self.predictor.predict(u.tokens)
            executed = u.executed_at(now)
            # unit_slack_and_due_s and _unit_rank, from one prediction: this loop runs on
            # every event while all workers are busy.
            left = predicted - executed if predicted > executed else 0.0
            judged = left * late_band if executed > 0.0 else left  # late_grace
            due = u.due_s(now, judged)[1]
            slack = slack_s(due, now, judged)
            # Past its prediction but within the overrun one unit in ten shows lately: most
            # likely nearly done. Its rest is taken as the band's, and it is not paused for
            # a newcomer that could wait (its slack, computed with nothing left, says nothing).
            grace = predicted < executed <= predicted * band
            remaining = predicted * band - executed if grace else left
            rank = (rank_key(slack, due), u.tiebreak)
            victims.append((rank, slack, remaining, grace, w))
        victims.sort(key=lambda v: v[0], reverse=True)
        # The best `pausing` waiting requests are expected to take the workers already pausing
        # (after_pause handover; one_hop gave each pausing worker its next unit already).
        skip = sum(1 for w in self.workers.values() if w.state is _PAUSING and w.next is None)
        one_hop = self.config.handover == "one_hop"
        memory = self.memory
        taken: list[RequestRecord] = []
        evicted: list[RequestRecord] = []
        while victims:
            top = self.queue.peek(now)
            if top is None:
                break
            rec, feasible = top
            self.queue.pop(now)
            taken.append(rec)
            if rec.cache_wait_until_s > now:
                continue  # it waits for a busy worker's cache: preempting buys nothing
            if skip:
                skip -= 1
                continue
            if not feasible:
                break  # a late newcomer cannot be saved by preempting anyone
            # The lowest-ranked victim whose unit could be held paused within its worker's
            # budgets with the newcomer running beside it.
            item = WorkItem(rec.request_id, rec.prefilled_tokens, rec.prompt_tokens)
            i = 0
            while i < len(victims) and not memory.may_pause(
                victims[i][4], self.requests, memory.item_bytes(victims[i][4].worker_id, item)
            ):
                i += 1
            if i == len(victims):
                break
            challenger_slack = self.queue.slack_s(rec, now)
            victim_rank, victim_slack, _, victim_in_grace, victim = victims[i]
            if not self._request_rank(rec, True) < victim_rank:
                break
            # Until some running unit finishes, the newcomer cannot start without preemption.
            soonest_free_s = min(v[2] for v in victims)
            would_miss = challenger_slack < soonest_free_s
            cost = self.predictor.predict(rec.remaining_tokens)
            victim_keeps_slack = not victim_in_grace and victim_slack - cost >= 0.0
            if not (would_miss or victim_keeps_slack):
                break  # a preemption would buy nothing: avoid thrashing
            self._make_room(victim, memory.item_bytes(victim.worker_id, item), now, out, evicted)
            out.append(self._preempt(victim))
            victims.pop(i)
            if one_hop:  # what replaces the victim goes with the preemption (handover.py)
                taken.pop()
                # _make_room left the newcomer room beside the paused victim.
                room = self.memory.room(victim, self.requests)
                room.take(item, force=True)
                items = self._batch(rec, victim, room, now)
                out.append(self._queue_next(victim, items, now, room))
        for rec in taken:
            self.queue.unpop(rec)
        # Queued only now, so that this event's preemption scan sees the queue it started with.
        for rec in evicted:
            self._queue(rec, now)

    def _overrun_band(self) -> float:
        """How far past its prediction a running unit may run and still count as nearly done
        (``overrun_grace``): the predictor's recent 90th-percentile actual/predicted ratio;
        1 (no grace) when it is off or nothing is learned online."""
        if not (self.config.overrun_grace and self.config.online_correction):
            return 1.0
        return self.predictor.overrun_ratio

    def _make_room(
        self,
        w: WorkerRecord,
        newcomer_bytes: int,
        now: float,
        out: list[Decision],
        evicted: list[RequestRecord],
    ) -> None:
        """Evict ``w``'s lowest-ranked paused units until its running unit can join them
        within the paused budget and a newcomer of ``newcomer_bytes`` can start beside them
        within the whole budget (the caller checked ``may_pause``)."""
        running = w.running
        assert running is not None
        pausing = self.memory.unit_bytes(running)
        for u in sorted(w.paused.values(), key=lambda u: self._unit_rank(u, now), reverse=True):
            if not self.memory.over(w, self.requests, pausing, newcomer_bytes):
                return
            discard, requeue = self._evict(u)
            out.append(discard)
            evicted.extend(requeue)

    # ------------------------------------------------------------------ introspection

    def waiting_in_priority_order(self, now: float) -> list[str]:
        """Request ids of all waiting requests in priority order at ``now`` (O(n log n))."""
        return [rec.request_id for rec in self.queue.in_order(now)]
