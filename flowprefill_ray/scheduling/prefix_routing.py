"""Cache-aware routing: which worker a new request starts on, given what each worker has cached.

Each prefill worker keeps the KV of finished prompts in a prefix cache (``model/prefix_cache.py``
in the runtime, ``simulator/prefix_cache.py`` in the simulator). The policy keeps its own view of
each cache, a ``BlockLRU`` of the block hashes it has seen finish there, and

- prices a request by its uncached tokens: on arrival by the best view (``cached_tokens`` hint,
  so ranking and batching treat a 20k-token prompt with 19k cached as the short job it is); when
  a unit starts, exactly for the worker chosen, whose items then start at the cached length
  (``WorkItem(start=cached)``: the worker takes ``[0, start)`` from its cache, and recomputes it
  if the blocks are gone by then);
- routes a new request (``route``) by the configured rule:

  ``least_loaded``  the policy's usual choice, ignoring caches;
  ``random``        a seeded random idle worker;
  ``cache_only``    always the worker with the longest cached prefix, waiting for it if busy;
  ``cache_aware``   a busy worker with a longer cached prefix than any idle one, as long as
                    the request still makes its deadline after waiting for that worker's
                    running unit (with ``affinity_margin_s`` to spare); otherwise the idle
                    worker with the longest cached prefix. Waiting costs the request slack it
                    has to spare, while recomputing a prefix costs the whole cluster
                    capacity; an urgent request, which cannot wait, starts where it can start
                    soonest.

A request waiting for a busy worker's cache is not a reason to preempt anyone until the last
moment at which waiting could still pay (``RequestRecord.cache_wait_until_s``); it is
reconsidered on every event, and goes to an idle worker once waiting no longer keeps its
deadline.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from .prefix_blocks import BlockLRU, reusable_tokens

if TYPE_CHECKING:
    from .predictor import TTFTPredictor
    from .records import RequestRecord, UnitRecord, WorkerRecord

Routing = Literal["cache_aware", "least_loaded", "random", "cache_only"]


class PrefixRoutingConfig(BaseModel):
    """``policy.prefix``: how the policy accounts for and routes by workers' prefix caches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        False, description="price requests by their uncached tokens and route by cache contents"
    )
    block_tokens: PositiveInt = Field(
        64, description="tokens per cached block; must match the workers' cache block size"
    )
    worker_capacity_blocks: NonNegativeInt = Field(
        16384, description="blocks the policy assumes one worker's cache holds (its view's size)"
    )
    routing: Routing = Field("cache_aware", description="how a new request picks its worker")
    affinity_margin_s: NonNegativeFloat = Field(
        0.0,
        description="cache_aware: wait for a busy worker's cache only when the request keeps "
        "at least this much slack after the wait, seconds",
    )
    defer_scan_limit: PositiveInt = Field(
        16,
        description="cache_aware/cache_only: most queued requests set aside for a busy "
        "worker's cache in one scheduling pass (bounds the work per event)",
    )
    seed: int = Field(0, description="random: seed of the worker choice")


class PrefixRouting:
    """Mixed into ``Policy``; the base class calls the ``_prefix_*`` hooks."""

    # Provided by Policy.
    predictor: TTFTPredictor
    workers: dict[str, WorkerRecord]
    counters: dict[str, int]

    def _init_prefix(self, config: PrefixRoutingConfig) -> None:
        self.prefix = config
        self._views: dict[str, BlockLRU] = {}
        self._rng = random.Random(config.seed)
        self.counters["prefix_hit_tokens"] = 0  # tokens started from a cached prefix
        self.counters["prefix_deferrals"] = 0  # times a request waited for a worker's cache

    # ------------------------------------------------------------------ hooks

    def _prefix_worker_joined(self, worker_id: str) -> None:
        if self.prefix.enabled:
            self._views[worker_id] = BlockLRU(self.prefix.worker_capacity_blocks)

    def _prefix_worker_left(self, worker_id: str) -> None:
        self._views.pop(worker_id, None)

    def _prefix_arrived(self, rec: RequestRecord) -> None:
        """Price a new request by the longest prefix any worker holds."""
        if self.prefix.enabled and rec.request.prefix_hashes:
            rec.cached_tokens = max((self.cached_on(w, rec) for w in self._views), default=0)

    def _prefix_start(self, worker_id: str, rec: RequestRecord, start: int, end: int) -> int:
        """Where an item ``[start, end)`` of ``rec`` really starts on ``worker_id``: at the
        cached prefix, for a whole prompt with nothing computed yet."""
        if not self.prefix.enabled or start != 0 or end != rec.prompt_tokens:
            return start
        cached = self.cached_on(worker_id, rec)
        rec.cached_tokens = cached
        self.counters["prefix_hit_tokens"] += cached
        return cached

    def _prefix_finished(self, worker_id: str, rec: RequestRecord) -> None:
        """``rec``'s whole prompt now sits in ``worker_id``'s cache."""
        view = self._views.get(worker_id)
        if view is not None and rec.request.prefix_hashes:
            view.insert(rec.request.prefix_hashes[: rec.prompt_tokens // self.prefix.block_tokens])

    # ------------------------------------------------------------------ views

    def cached_on(self, worker_id: str, rec: RequestRecord) -> int:
        """Prompt tokens of ``rec`` the policy believes ``worker_id`` can serve from cache."""
        view = self._views.get(worker_id)
        if view is None:
            return 0
        blocks = view.cached_blocks(rec.request.prefix_hashes)
        return reusable_tokens(blocks, self.prefix.block_tokens, rec.prompt_tokens)

    # ------------------------------------------------------------------ routing

    def route(
        self,
        rec: RequestRecord,
        idle: list[WorkerRecord],
        usual: WorkerRecord,
        slack_s: float,
        remaining_s: dict[str, float],
        now: float,
    ) -> WorkerRecord | None:
        """The worker ``rec`` starts on now, or None to leave it queued for a busy worker.

        ``usual`` is the policy's own choice among ``idle``; ``slack_s`` the request's slack
        priced by its arrival hint; ``remaining_s`` the predicted compute left on each busy
        worker's running unit."""
        mode = self.prefix.routing
        if not self.prefix.enabled or not rec.request.prefix_hashes or mode == "least_loaded":
            return usual
        if mode == "random":
            return self._rng.choice(idle)
        best_idle, best_idle_cached = usual, self.cached_on(usual.worker_id, rec)
        for w in idle:
            cached = self.cached_on(w.worker_id, rec)
            if cached > best_idle_cached:
                best_idle, best_idle_cached = w, cached
        busy_id, busy_cached = None, best_idle_cached
        for worker_id in remaining_s:
            cached = self.cached_on(worker_id, rec)
            if cached > busy_cached:
                busy_id, busy_cached = worker_id, cached
        if busy_id is None:
            return best_idle
        if mode == "cache_only":
            return self._defer(rec, float("inf"))
        # cache_aware: does the request still make its deadline after waiting for busy_id?
        predict = self.predictor.predict
        there_s = predict(rec.prompt_tokens - busy_cached)
        time_left = slack_s + predict(rec.remaining_tokens)  # deadline - now
        spare = time_left - remaining_s[busy_id] - there_s - self.prefix.affinity_margin_s
        if spare >= 0.0:
            # The last moment it can still start there on time: until then, no preemption.
            return self._defer(rec, now + time_left - there_s - self.prefix.affinity_margin_s)
        return best_idle

    def _defer(self, rec: RequestRecord, until_s: float) -> None:
        self.counters["prefix_deferrals"] += 1
        rec.cache_wait_until_s = until_s
        return None

    def busy_remaining_s(self, now: float) -> dict[str, float]:
        """Predicted compute left before each busy worker is free: its running unit plus the
        unit queued behind it by a one-hop preemption (``WorkerRecord.next``), which runs
        first once the running one stops."""
        out = {}
        for w in self.workers.values():
            units: list[UnitRecord] = [u for u in (w.running, w.next) if u is not None]
            if units:
                out[w.worker_id] = sum(self.unit_remaining_s(u, now) for u in units)  # type: ignore[attr-defined]
        return out
