"""KV memory accounting: what each worker may hold, in bytes, and what its units cost.

A worker states its ``KVBudget`` when it joins (``WorkerJoined.kv_budget``): the runtime
measures it on the device (``runtime/kv_budget.py``), the simulator takes it from its config.
A worker without one is unbounded.

What a unit costs. An item ``[start, end)`` writes the KV of its ``end - start`` new tokens
(the prefix ``[0, start)`` of a chunked request is already on the worker, counted with the
worker's partial requests) and, while it runs or waits paused, keeps the activations of the
chunk in flight: at most ``min(end - start, chunk_tokens)`` tokens of them, and as it ends
its last token's logits (``sequence_bytes``). A unit costs the
same running, pausing and paused: what it holds only grows until it completes, so reserving
its end state from the start keeps the worker within its budget at every moment.

What a worker holds (``held_bytes``): its running or pausing unit, the unit queued behind a
pausing one (one-hop handover), its paused units and the KV of its requests between chunks.
A finished prompt's KV leaves with the hand-off to a decode worker, issued as the unit
completes, and is not counted.

The policies keep two rules with it (``policy.py``, ``flowprefill.py``):

1. a unit is formed only within the worker's free bytes (``UnitRoom``): batch members that
   do not fit are left waiting; a head that does not fit first evicts the worker's paused
   units, and one larger than the whole budget runs alone anyway (``over_budget_units``),
   since no worker could ever run it otherwise;
2. paused and pausing units hold at most ``paused_budget_bytes``: before a preemption the
   worker's lowest-ranked paused units are evicted until the victim fits, and a victim that
   alone exceeds it is not preempted.

Plain Python, like the rest of ``scheduling``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .events import WorkItem
from .records import RequestRecord, UnitRecord, WorkerRecord, WorkerState


@dataclass(frozen=True, slots=True)
class KVBudget:
    """One worker's memory for KV and paused state, bytes.

    ``kv_bytes_per_token``: the KV of one prompt token over all layers (keys and values);
    ``activation_bytes_per_token``: what a paused forward keeps per token of its chunk in
    flight beyond that KV (hidden states, projections, rope tables); ``sequence_bytes``: what
    a forward holds per sequence beyond both (its last token's logits)."""

    budget_bytes: int
    paused_budget_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int = 0
    sequence_bytes: int = 0

    def __post_init__(self) -> None:
        if self.budget_bytes < 1 or self.kv_bytes_per_token < 1:
            raise ValueError(
                f"a KV budget needs budget_bytes >= 1 and kv_bytes_per_token >= 1, got "
                f"{self.budget_bytes} and {self.kv_bytes_per_token}"
            )
        if not 0 <= self.paused_budget_bytes <= self.budget_bytes:
            raise ValueError(
                f"paused_budget_bytes must lie in [0, budget_bytes={self.budget_bytes}], "
                f"got {self.paused_budget_bytes}"
            )
        if self.activation_bytes_per_token < 0 or self.sequence_bytes < 0:
            raise ValueError("activation_bytes_per_token and sequence_bytes must be >= 0")

    @classmethod
    def of_tokens(cls, paused_tokens: int, total_tokens: int | None = None) -> KVBudget:
        """A budget counted in prompt tokens (one byte per token, no activations): the
        simulator's and the tests' shorthand. ``total_tokens`` None = 2**62 (no limit)."""
        total = 2**62 if total_tokens is None else total_tokens
        return cls(total, paused_tokens, 1)

    def item_bytes(self, item: WorkItem, chunk_tokens: int) -> int:
        new = item.end - item.start
        activations = min(new, chunk_tokens) * self.activation_bytes_per_token
        return new * self.kv_bytes_per_token + activations + self.sequence_bytes


class UnitRoom:
    """The free bytes of one idle worker while a unit is formed for it; ``take`` reserves."""

    __slots__ = ("budget", "chunk_tokens", "free", "over_budget")

    def __init__(self, budget: KVBudget | None, held: int, chunk_tokens: int) -> None:
        self.budget = budget
        self.chunk_tokens = chunk_tokens
        self.free = None if budget is None else budget.budget_bytes - held
        self.over_budget = False  # a forced item did not fit

    def need(self, item: WorkItem) -> int:
        return 0 if self.budget is None else self.budget.item_bytes(item, self.chunk_tokens)

    def fits(self, item: WorkItem) -> bool:
        return self.free is None or self.need(item) <= self.free

    def take(self, item: WorkItem, force: bool = False) -> bool:
        """Reserve ``item``'s bytes if they fit (or anyway with ``force``): True if taken."""
        if self.free is None:
            return True
        need = self.need(item)
        if need > self.free:
            if not force:
                return False
            self.over_budget = True
        self.free -= need
        return True


class KVMemory:
    """The budgets of a policy's workers and the bytes their units hold (see the module
    docstring). ``chunk_tokens``: the longest piece of a prompt in one forward."""

    def __init__(self, chunk_tokens: int) -> None:
        self.chunk_tokens = chunk_tokens
        self.budgets: dict[str, KVBudget] = {}

    def join(self, worker_id: str, budget: KVBudget | None) -> None:
        if budget is None:
            self.budgets.pop(worker_id, None)
        else:
            self.budgets[worker_id] = budget

    def leave(self, worker_id: str) -> None:
        self.budgets.pop(worker_id, None)

    def items_bytes(self, worker_id: str, items: Iterable[WorkItem]) -> int:
        """What a unit of ``items`` would hold on ``worker_id`` at most (0: unbounded)."""
        budget = self.budgets.get(worker_id)
        if budget is None:
            return 0
        return sum(budget.item_bytes(item, self.chunk_tokens) for item in items)

    @staticmethod
    def unit_bytes(u: UnitRecord) -> int:
        """What unit ``u`` holds on its worker at most, priced when it was formed."""
        return u.kv_bytes

    def paused_bytes(self, w: WorkerRecord) -> int:
        """Bytes of ``w``'s paused units and of its pausing unit, if any."""
        held = sum(self.unit_bytes(u) for u in w.paused.values())
        if w.state is WorkerState.PAUSING and w.running is not None:
            held += self.unit_bytes(w.running)
        return held

    def held_bytes(self, w: WorkerRecord, requests: Mapping[str, RequestRecord]) -> int:
        """Everything ``w`` holds: running or pausing unit, queued unit, paused units, partial
        KV."""
        budget = self.budgets.get(w.worker_id)
        if budget is None:
            return 0
        held = sum(self.unit_bytes(u) for u in w.paused.values())
        for u in (w.running, w.next):  # next: queued behind a pausing unit (handover.py)
            if u is not None:
                held += self.unit_bytes(u)
        per_token = budget.kv_bytes_per_token
        return held + sum(requests[rid].prefilled_tokens * per_token for rid in w.partial)

    def room(self, w: WorkerRecord, requests: Mapping[str, RequestRecord]) -> UnitRoom:
        """The free bytes of idle worker ``w`` for a new unit."""
        return UnitRoom(
            self.budgets.get(w.worker_id), self.held_bytes(w, requests), self.chunk_tokens
        )

    def item_bytes(self, worker_id: str, item: WorkItem) -> int:
        """What ``item`` would hold on ``worker_id`` (0 on an unbounded worker)."""
        budget = self.budgets.get(worker_id)
        return 0 if budget is None else budget.item_bytes(item, self.chunk_tokens)

    def may_pause(
        self, w: WorkerRecord, requests: Mapping[str, RequestRecord], then_start: int = 0
    ) -> bool:
        """Whether ``w``'s running unit could be held paused there, and a unit of
        ``then_start`` bytes start beside it, once every other paused unit is evicted."""
        budget = self.budgets.get(w.worker_id)
        if budget is None or w.running is None:
            return True
        pausing = self.unit_bytes(w.running)
        partial = sum(requests[rid].prefilled_tokens for rid in w.partial)
        return (
            pausing <= budget.paused_budget_bytes
            and pausing + then_start + partial * budget.kv_bytes_per_token <= budget.budget_bytes
        )

    def over(
        self,
        w: WorkerRecord,
        requests: Mapping[str, RequestRecord],
        also_paused: int = 0,
        also_held: int = 0,
    ) -> bool:
        """Whether ``w`` holds more than its budgets allow once ``also_paused`` more bytes are
        paused there and ``also_held`` more are held (a unit about to start)."""
        budget = self.budgets.get(w.worker_id)
        if budget is None:
            return False
        if self.paused_bytes(w) + also_paused > budget.paused_budget_bytes:
            return True
        return self.held_bytes(w, requests) + also_held > budget.budget_bytes

    def stats(
        self, workers: Iterable[WorkerRecord], requests: Mapping[str, RequestRecord]
    ) -> dict[str, dict[str, int]]:
        """Per budgeted worker: its budget and what the policy counts it holding, bytes."""
        return {
            w.worker_id: {
                "budget_bytes": self.budgets[w.worker_id].budget_bytes,
                "paused_budget_bytes": self.budgets[w.worker_id].paused_budget_bytes,
                "held_bytes": self.held_bytes(w, requests),
                "paused_bytes": self.paused_bytes(w),
            }
            for w in workers
            if w.worker_id in self.budgets
        }
