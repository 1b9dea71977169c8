"""What a scheduling policy hears (events) and what it says (decisions).

This is the contract between a policy and whatever executes its decisions: the discrete-event
simulator and the Ray scheduler actor both speak it, so they run the very same policy objects.

Execution model. A worker (one prefill GPU) executes at most one *work unit* at a time. A unit
is a batch of *work items*; an item is a contiguous range of one request's prompt tokens. A
whole-request prefill is one item ``[0, prompt_tokens)``; a chunk of a chunked prefill is
``[start, end)`` and attends the KV of ``[0, start)``, which therefore lives on the same worker.
A running unit can be preempted: the worker stops at its next checkpoint, keeps the paused state
(activations and KV) and reports ``UnitPaused``. A paused unit can only resume on its worker.

Admission. On ``Arrival`` a policy may answer ``Reject`` (the request is refused: HTTP 429 with
``Retry-After``; the request is terminal) or ``Downgrade`` (the request is admitted under a
looser SLO class; its deadline is now ``arrival_s + ttft_slo_s`` of that class and every later
decision uses it). A ``Downgrade`` always comes before any ``RunUnit`` that holds the request,
in the same decision list; the executor tells the client and goes on as for an admitted request.
With ``admission.overtake_looser`` an arrival of a tight class may also be admitted at the
expense of waiting requests of looser classes: each one it demotes behind all feasible work
is named in an ``Overtaken`` (still admitted, still judged by its own target). An executor
needs to do nothing with it; the timeline records it to explain the miss it will likely be.

Memory. A worker joins with its KV memory budget in bytes (``kv_memory.py``); a policy forms
units within it and may ``Discard`` a paused unit whose requests are still live, to free
memory: those requests are back in the policy's queue, WAITING, with no progress (they will
be recomputed from token 0) and their deadlines unchanged. The executor
frees the unit's state and keeps the requests open; they come back in a later ``RunUnit``.

Time is always in seconds, on the clock of whoever drives the policy (simulated time in the
simulator, the scheduler actor's monotonic clock in the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .kv_memory import KVBudget
    from .request import Request


@dataclass(frozen=True, slots=True)
class WorkItem:
    """Prompt tokens ``[start, end)`` of one request."""

    request_id: str
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """What one worker executes between two scheduling decisions."""

    unit_id: int
    worker_id: str
    items: tuple[WorkItem, ...]

    @property
    def tokens(self) -> int:
        return sum(item.tokens for item in self.items)

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(item.request_id for item in self.items)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request entered the system (its ``arrival_s`` is already stamped)."""

    request: Request


@dataclass(frozen=True, slots=True)
class UnitCompleted:
    """A work unit finished. ``executed_s`` is its compute time over all its runs (pauses
    excluded): what the TTFT predictor is corrected with."""

    worker_id: str
    unit_id: int
    executed_s: float


@dataclass(frozen=True, slots=True)
class UnitPaused:
    """A preempted unit stopped at a checkpoint. ``executed_s`` is its compute time so far;
    ``blocking_s`` is how long the stop took after the preempt decision."""

    worker_id: str
    unit_id: int
    executed_s: float
    blocking_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    """A worker is ready for work. ``kv_budget``: the bytes it may hold in KV and paused
    state (``kv_memory.py``); None = unbounded."""

    worker_id: str
    kv_budget: KVBudget | None = None


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    """A worker died or was removed. Its running and paused work is lost; the policy re-queues
    the requests (deadlines unchanged, progress reset)."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The client gave up on a request (disconnect, explicit abort)."""

    request_id: str


Event = Union[Arrival, UnitCompleted, UnitPaused, WorkerJoined, WorkerLeft, Cancelled]


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class RunUnit:
    """Start a new unit on an idle worker."""

    unit: WorkUnit

    @property
    def worker_id(self) -> str:
        return self.unit.worker_id


@dataclass(frozen=True, slots=True)
class Preempt:
    """Stop the worker's running unit at its next checkpoint. The worker answers with
    ``UnitPaused`` (or ``UnitCompleted`` if the unit finished first)."""

    worker_id: str
    unit_id: int


@dataclass(frozen=True, slots=True)
class Resume:
    """Continue a paused unit on the (idle) worker that holds its state."""

    worker_id: str
    unit_id: int


@dataclass(frozen=True, slots=True)
class Discard:
    """Drop a paused unit's state: its requests were cancelled, or memory is needed (then
    its live requests are re-queued by the policy and run again later from token 0).
    ``request_ids``: the unit's members, for a driver that frees what they hold (the policy
    forgets the unit as it decides this; not part of the decision's identity)."""

    worker_id: str
    unit_id: int
    request_ids: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Reject:
    """Admission control refused a request (HTTP 429 at the API)."""

    request_id: str
    reason: str
    retry_after_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Downgrade:
    """Admission control moved a request to a looser SLO class, because it was predicted to
    miss its own; it is admitted with the deadline ``arrival_s + ttft_slo_s`` (seconds).
    Sent once, on its ``Arrival``, before any unit holding it starts."""

    request_id: str
    slo_class: str
    ttft_slo_s: float


@dataclass(frozen=True, slots=True)
class Overtaken:
    """A waiting request of a looser SLO class is demoted behind all feasible work, for good,
    to make room for ``by_request_id``, a tighter-class arrival that would otherwise have been
    refused (``admission.overtake_looser``). It stays admitted and is judged by its own
    target; it runs when nothing feasible waits."""

    request_id: str
    by_request_id: str


Decision = Union[RunUnit, Preempt, Resume, Discard, Reject, Downgrade, Overtaken]
