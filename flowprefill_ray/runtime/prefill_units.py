"""The state a prefill worker keeps per work unit and per prompt while a unit runs or waits paused.

Plain data with the few rules that belong to it (which items still need compute, when a run
must stop at its next checkpoint, how many bytes a paused unit keeps alive); the executor
decides what to run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from flowprefill_ray.model.kv import KVCache

from .messages import PrefillItemSpec


@dataclass
class ItemProgress:
    spec: PrefillItemSpec
    done: int = 0  # tokens of [start, end) already prefilled
    kv: KVCache | None = None  # KV of [0, start + done)
    first_token: tuple[int, bytes | None] | None = None  # (token id, sampler RNG state)
    error: str | None = None  # why this item failed (for the server log, never the client)
    cached_tokens: int = 0  # of ``done``, the tokens served from the prefix cache

    @property
    def remaining(self) -> int:
        return self.spec.end - self.spec.start - self.done

    @property
    def pending(self) -> bool:
        return self.error is None and self.remaining > 0

    def fail(self, error: Exception) -> None:
        """This item alone has failed: keep why (for the log) and drop its KV."""
        self.error = f"{type(error).__name__}: {error}"
        self.kv = None


@dataclass
class WorkUnit:
    unit_id: int
    items: list[ItemProgress]
    state: object | None = None  # the PrefillState of the chunk in flight
    in_state: list[int] = field(default_factory=list)  # item indices in that state
    executed_s: float = 0.0
    pause: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)
    pause_requested_at: float | None = None
    blocking_s: float = 0.0
    # perf_counter() of the last checkpoint passed: a pause stops at the next one, so the
    # block in flight when the preempt arrived runs from here to the stop.
    checkpoint_at: float = 0.0
    block_s: float = 0.0
    run_started_wall_s: float = 0.0  # time.time() when this run (or resume) began computing
    # Set once a batched forward of this unit raised: from then on its items run one at a
    # time, so the item that raises is found and fails alone.
    isolated: bool = False

    def should_pause(self) -> bool:
        """The checkpoint callback of ``PrefillState.run``."""
        if self.pause.is_set():
            return True
        self.checkpoint_at = time.perf_counter()
        return False


def paused_bytes(unit: WorkUnit) -> int:
    """Bytes a paused unit keeps alive: its PrefillState (activations, the KV written so far and
    the prefix KV it reads) and the KV of its items that are not in that state."""
    total = unit.state.nbytes if unit.state is not None else 0
    for index, item in enumerate(unit.items):
        if item.kv is not None and index not in unit.in_state:
            total += item.kv.nbytes
    return total
