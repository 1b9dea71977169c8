"""The compute side of a prefill worker: runs work units on one model, pauses and resumes them.

Plain Python (no Ray) so it can be tested alone. ``run``/``resume`` execute on the worker's
compute thread; ``request_pause``, ``discard``, ``take_kv`` and ``drop_request`` are called from
control threads while a unit computes. A paused unit is an ordinary ``PrefillState`` kept in a
table: resuming continues at the next operator, nothing is recomputed.

A unit whose items are longer than ``chunk_tokens`` runs as consecutive chunks back to back
(each chunk attends the KV of the earlier ones); a pause can happen inside any chunk.

One request's failure never fails the others in its unit: if a batched forward raises, the unit
falls back to running its remaining items one at a time, so only the culprit fails; a failed
item (forward or first-token sampling) is reported in ``UnitOutcome.failed`` and its KV dropped.
A unit that ends in any way (completed, failed, discarded) leaves nothing behind on the worker,
except the full blocks of completed prompts in the optional prefix cache (prefix_reuse.py).
"""

from __future__ import annotations

import threading
import time

import torch

from flowprefill_ray.model.kv import KVCache
from flowprefill_ray.model.prefix_cache import PrefixCache
from flowprefill_ray.model.sampling import sample_with_params

from .messages import FailedItem, FirstToken, PrefillItemSpec, UnitOutcome
from .output_rules import OutputRules
from .prefill_units import ItemProgress, WorkUnit, paused_bytes
from .prefix_reuse import PrefixReuse

# How many finished unit ids to remember, so a preempt that arrives after its unit completed
# answers at once instead of waiting for a unit that will never run again.
_FINISHED_MEMORY = 4096


class UnknownUnitError(KeyError):
    """A resume or discard named a unit this worker does not hold."""


class PrefillExecutor:
    """Runs and pauses prefill work units on one loaded model.

    ``granularity``: where a run may stop ("block", "layer", "operator").
    ``chunk_tokens``: the largest piece of one prompt run in a single forward (tokens).
    ``checkpoint_sync`` / ``max_run_ahead``: how a checkpoint waits for the device ("sync" or
    "bounded", see flowprefill_ray/model/checkpoint_sync.py).
    ``prefix_cache``: reuse the KV of cached prompt prefixes (None: off); ``share_unsalted``:
    whether requests without a cache salt use it (see ``PrefixReuse``).
    """

    def __init__(
        self,
        model,
        granularity: str = "block",
        chunk_tokens: int = 8192,
        output_rules: OutputRules | None = None,
        checkpoint_sync: str = "sync",
        max_run_ahead: int = 2,
        prefix_cache: PrefixCache | None = None,
        share_unsalted: bool = True,
    ):
        self.model = model
        # Decides, here and only here, whether the first token already ends the request (EOS,
        # max_tokens=1, a stop string) and makes its text; the default knows EOS and lengths
        # but no stop strings (no tokenizer).
        self.output_rules = output_rules or OutputRules.for_model(model)
        self.granularity = granularity
        self.chunk_tokens = chunk_tokens
        self.checkpoint_sync = checkpoint_sync
        self.max_run_ahead = max_run_ahead
        self._lock = threading.Lock()
        self._units: dict[int, WorkUnit] = {}
        self._running: int | None = None
        self._finished: dict[int, None] = {}  # insertion-ordered set of finished unit ids
        self._partial_kv: dict[str, KVCache] = {}  # KV of earlier chunks, by request
        self._ready_kv: dict[str, KVCache] = {}  # finished prompts waiting for a decode worker
        self._units_completed = 0
        self.prefix_reuse = PrefixReuse(prefix_cache, share_unsalted)
        # The most this worker held at once, running unit included (bytes): sampled each time
        # a forward stops (a pause or a chunk's end), when a unit holds the most it will.
        self._held_peak = 0

    # ------------------------------------------------------------------ compute thread

    def run(self, unit_id: int, items: list[PrefillItemSpec]) -> UnitOutcome:
        """Start a new unit and run it until it completes or is paused."""
        if not items:
            raise ValueError(f"unit {unit_id} has no work items")
        progress = []
        for spec in items:
            if spec.start == 0:  # a new prompt: it may begin with cached blocks
                progress.append(self.prefix_reuse.start(spec))
                continue
            prefix = self._partial_kv.pop(spec.request_id, None)
            if prefix is None and len(spec.prefix_token_ids) == spec.start:
                # Started at a prefix the policy believes cached here: whatever of it is
                # cached is reused, the rest computed (a whole prompt from token 0).
                progress.append(self.prefix_reuse.start(self.prefix_reuse.whole_prompt(spec)))
                continue
            if prefix is None or prefix.num_tokens != spec.start:
                # This item cannot continue; the others in the unit still can.
                have = None if prefix is None else prefix.num_tokens
                progress.append(
                    ItemProgress(
                        spec,
                        error=f"starts at token {spec.start} but this worker holds KV "
                        f"of {have} tokens for it",
                    )
                )
                continue
            progress.append(ItemProgress(spec, kv=prefix))
        with self._lock:
            unit = self._units.get(unit_id)
            if unit is None:  # a preempt may have arrived first and created the record
                unit = WorkUnit(unit_id, progress)
                self._units[unit_id] = unit
            else:
                unit.items = progress
        return self._execute(unit)

    def resume(self, unit_id: int) -> UnitOutcome:
        """Continue a paused unit where it stopped."""
        with self._lock:
            unit = self._units.get(unit_id)
            if unit is None or not unit.items:
                raise UnknownUnitError(f"resume: this worker holds no paused unit {unit_id}")
            unit.pause.clear()
            unit.stopped.clear()
            unit.pause_requested_at = None
        return self._execute(unit)

    def _execute(self, unit: WorkUnit) -> UnitOutcome:
        with self._lock:
            self._running = unit.unit_id
        unit.run_started_wall_s = time.time()  # the scheduler times its dispatch path with it
        try:
            while True:
                if unit.pause.is_set():
                    return self._paused(unit)
                if unit.state is None:
                    pending = [i for i, p in enumerate(unit.items) if p.pending]
                    if not pending:
                        return self._completed(unit)
                    if unit.isolated:
                        pending = pending[:1]
                    unit.in_state = pending
                    try:
                        unit.state = self.model.start_prefill(
                            [self._next_chunk(unit.items[i]) for i in pending],
                            granularity=self.granularity,
                            prefixes=[unit.items[i].kv for i in pending],
                            checkpoint_sync=self.checkpoint_sync,
                            max_run_ahead=self.max_run_ahead,
                        )
                    except Exception as error:  # noqa: BLE001 - isolated per item below
                        self._forward_failed(unit, error)
                        continue
                started = unit.checkpoint_at = time.perf_counter()
                try:
                    finished = unit.state.run(unit.should_pause)
                except Exception as error:  # noqa: BLE001 - isolated per item below
                    unit.executed_s += time.perf_counter() - started
                    self._forward_failed(unit, error)
                    continue
                unit.executed_s += time.perf_counter() - started
                self._note_peak(unit)
                if not finished:
                    return self._paused(unit)
                self._absorb_chunk(unit)
        except BaseException:
            # Anything else (a bug, an interrupt): the unit is over, and must not stay here
            # looking paused while holding its activations and KV.
            self._release(unit)
            raise
        finally:
            with self._lock:
                self._running = None

    def _forward_failed(self, unit: WorkUnit, error: Exception) -> None:
        """A forward over ``unit.in_state`` raised. With several items in it, nothing says which
        one is at fault: rerun them one at a time from their last finished chunk (their KV is
        only replaced when a chunk completes). With one item, that item has failed."""
        members = unit.in_state
        unit.state = None
        unit.in_state = []
        if len(members) > 1:
            unit.isolated = True
            return
        unit.items[members[0]].fail(error)

    def _next_chunk(self, item: ItemProgress) -> list[int]:
        offset = item.done
        return list(item.spec.token_ids[offset : offset + min(self.chunk_tokens, item.remaining)])

    def _absorb_chunk(self, unit: WorkUnit) -> None:
        result = unit.state.result()
        for row, index in enumerate(unit.in_state):
            item = unit.items[index]
            item.done += min(self.chunk_tokens, item.remaining)
            item.kv = result.kv[row]
            if item.remaining == 0 and item.spec.is_last:
                try:
                    item.first_token = self._sample_first(
                        item.spec, result.last_logits[row : row + 1]
                    )
                except Exception as error:  # noqa: BLE001 - one request's sampler fails alone
                    item.fail(error)
        unit.state = None
        unit.in_state = []

    def _sample_first(
        self, spec: PrefillItemSpec, logits: torch.Tensor
    ) -> tuple[int, bytes | None]:
        generator = spec.sampling.make_generator(logits.device)
        token = int(sample_with_params(logits, [spec.sampling], [generator])[0])
        state = None if generator is None else bytes(generator.get_state().numpy().tobytes())
        return token, state

    def _paused(self, unit: WorkUnit) -> UnitOutcome:
        with self._lock:
            requested = unit.pause_requested_at
            now = time.perf_counter()
            unit.blocking_s = 0.0 if requested is None else now - requested
            unit.block_s = now - unit.checkpoint_at if unit.checkpoint_at else 0.0
            unit.stopped.set()
        return UnitOutcome(
            unit.unit_id,
            "paused",
            unit.executed_s,
            unit.blocking_s,
            block_s=unit.block_s,
            started_wall_s=unit.run_started_wall_s,
        )

    def _completed(self, unit: WorkUnit) -> UnitOutcome:
        firsts, failed, cached = [], [], []
        for item in unit.items:  # outside the lock: copying blocks takes a while on CPU
            if item.error is None:
                self.prefix_reuse.finished(item)
        with self._lock:
            for item in unit.items:
                spec = item.spec
                if item.error is not None:
                    failed.append(FailedItem(spec.request_id, item.error))
                    self.prefix_reuse.forget(spec.request_id)
                    continue
                if item.cached_tokens:
                    cached.append((spec.request_id, item.cached_tokens))
                if spec.is_last:
                    token, gen_state = item.first_token
                    first = self.output_rules.first_output(spec.sampling, spec.prompt_tokens, token)
                    if first.finish_reason is None:  # KV waits here until a decode worker takes it
                        self._ready_kv[spec.request_id] = item.kv
                    firsts.append(
                        FirstToken(
                            spec.request_id,
                            token,
                            item.kv.num_tokens,
                            item.kv.nbytes,
                            gen_state,
                            first.finish_reason,
                            first.shown,
                            first.text,
                        )
                    )
                else:
                    self._partial_kv[spec.request_id] = item.kv
            self._forget(unit)
            self._units_completed += 1
            requested = unit.pause_requested_at
            unit.blocking_s = 0.0 if requested is None else time.perf_counter() - requested
            unit.stopped.set()
        return UnitOutcome(
            unit.unit_id,
            "completed",
            unit.executed_s,
            0.0,
            tuple(firsts),
            failed=tuple(failed),
            started_wall_s=unit.run_started_wall_s,
            cached_tokens=tuple(cached),
        )

    def _release(self, unit: WorkUnit) -> None:
        """Forget a unit that ended abnormally, with everything its requests held here."""
        with self._lock:
            self._forget(unit)
            for item in unit.items:
                self._partial_kv.pop(item.spec.request_id, None)
                self._ready_kv.pop(item.spec.request_id, None)
                self.prefix_reuse.forget(item.spec.request_id)
            unit.state = None
            unit.items = []
            unit.stopped.set()

    def _forget(self, unit: WorkUnit) -> None:
        # Caller holds the lock.
        self._units.pop(unit.unit_id, None)
        self._finished[unit.unit_id] = None
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.pop(next(iter(self._finished)))

    # ----------------------------------------------------------------- control threads

    def request_pause(self, unit_id: int, timeout_s: float = 60.0) -> tuple[bool, float]:
        """Ask ``unit_id`` to stop at its next checkpoint and wait until it has stopped.

        Returns ``(paused, blocking_s)``: ``paused`` is False when the unit completed (or was
        already done) instead; ``blocking_s`` is the wait in seconds.
        """
        with self._lock:
            if unit_id in self._finished:
                return False, 0.0
            unit = self._units.get(unit_id)
            if unit is None:
                # The preempt overtook its run call (threaded actors may reorder calls): leave a
                # record so the run pauses before computing anything.
                unit = WorkUnit(unit_id, [])
                self._units[unit_id] = unit
            if unit.stopped.is_set() and unit.pause.is_set():
                return True, 0.0  # already paused
            unit.pause_requested_at = time.perf_counter()
            unit.pause.set()
        if not unit.stopped.wait(timeout_s):
            raise TimeoutError(f"unit {unit_id} did not reach a checkpoint within {timeout_s} s")
        with self._lock:
            paused = unit_id not in self._finished
        return paused, unit.blocking_s

    def discard(self, unit_id: int) -> bool:
        """Drop a paused unit's state (activations and KV). Returns False if not held."""
        with self._lock:
            if self._running == unit_id:
                raise RuntimeError(f"discard: unit {unit_id} is running; preempt it first")
            unit = self._units.pop(unit_id, None)
            if unit is None:
                return False
            self._finished[unit_id] = None
            for item in unit.items:
                self.prefix_reuse.forget(item.spec.request_id)
            return True

    def reset(self, timeout_s: float = 60.0) -> dict:
        """Forget every unit and every KV this worker holds (a new scheduler adopts it).

        A unit still computing for the old scheduler is stopped at its next checkpoint first.
        Returns what was dropped: ``{"units": n, "kv_requests": n, "bytes": n}``.
        """
        with self._lock:
            running = self._units.get(self._running) if self._running is not None else None
            if running is not None and not running.stopped.is_set():
                running.pause_requested_at = time.perf_counter()
                running.pause.set()
        if running is not None and not running.stopped.wait(timeout_s):
            raise TimeoutError(
                f"unit {running.unit_id} did not reach a checkpoint in {timeout_s} s"
            )
        with self._lock:
            units = [u for u in self._units.values() if u.items]
            kv = [*self._partial_kv.values(), *self._ready_kv.values()]
            dropped = {
                "units": len(units),
                "kv_requests": len(kv),
                "bytes": sum(paused_bytes(u) for u in units) + sum(k.nbytes for k in kv),
            }
            self._units.clear()
            self._partial_kv.clear()
            self._ready_kv.clear()
            self.prefix_reuse.reset()
            # The new scheduler numbers its units from 1 again.
            self._finished.clear()
            return dropped

    def take_kv(self, request_id: str) -> KVCache:
        """Hand over (and forget) a finished prompt's KV."""
        with self._lock:
            kv = self._ready_kv.pop(request_id, None)
        if kv is None:
            raise KeyError(f"take_kv: no finished KV for request {request_id}")
        return kv

    def drop_request(self, request_id: str) -> int:
        """Free every KV this worker keeps for a request; returns the bytes freed."""
        with self._lock:
            freed = 0
            self.prefix_reuse.forget(request_id)
            for table in (self._partial_kv, self._ready_kv):
                kv = table.pop(request_id, None)
                if kv is not None:
                    freed += kv.nbytes
            return freed

    def stats(self) -> dict:
        """Units and KV this worker holds (for load reports and leak checks in tests)."""
        with self._lock:
            paused = self._paused_units()
            held, paused_total = self._held(paused)
            return {
                "running_unit": self._running,
                "units_completed": self._units_completed,
                "paused_units": len(paused),
                # Which ones: the scheduler's view must name the same (engine.stats checks).
                "paused_unit_ids": sorted(u.unit_id for u in paused),
                "paused_requests": sum(len(u.items) for u in paused),
                "partial_kv_requests": len(self._partial_kv),
                "ready_kv_requests": len(self._ready_kv),
                "held_kv_bytes": held,
                # Activations and KV kept alive by paused units: memory a GPU must budget for.
                "paused_bytes": paused_total,
                # Everything this worker holds between units (exported as a gauge).
                "held_bytes": held + paused_total,
                # Kept apart from held_bytes: cached blocks stay by design (None: cache off).
                "prefix_cache": self.prefix_reuse.stats(),
                # The most it ever held at once, its running unit included.
                "held_bytes_peak": self._held_peak,
            }

    def held_bytes(self) -> int:
        """Everything this worker holds between units, bytes (``stats()["held_bytes"]``)."""
        with self._lock:
            return sum(self._held(self._paused_units()))

    def _note_peak(self, unit: WorkUnit) -> None:
        """Sample what this worker holds now, ``unit`` (the one computing) included."""
        with self._lock:
            kv, paused = self._held(self._paused_units())
            now = kv + paused + paused_bytes(unit)
            self._held_peak = max(self._held_peak, now)

    def _paused_units(self) -> list[WorkUnit]:
        # Caller holds the lock.
        return [u for u in self._units.values() if u.items and u.unit_id != self._running]

    def _held(self, paused: list[WorkUnit]) -> tuple[int, int]:
        """(KV bytes kept for chunked and finished prompts, bytes of the ``paused`` units)."""
        # Caller holds the lock.
        kv = sum(kv.nbytes for kv in (*self._partial_kv.values(), *self._ready_kv.values()))
        # The prefix cache is not counted: its budget is set aside from the KV budget the
        # policy keeps these bytes within (kv_budget.py), and it keeps itself under it.
        return kv, sum(paused_bytes(u) for u in paused)
