"""The light mutable records a policy keeps per request, per work unit and per worker.

Plain slotted dataclasses rather than pydantic models: they are touched on every event and
the scheduler must decide in microseconds with thousands of requests queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .events import WorkUnit
from .request import Request, RequestStatus


class UnitState(str, Enum):
    RUNNING = "running"
    PAUSING = "pausing"  # preempt sent, UnitPaused (or UnitCompleted) not yet heard
    PAUSED = "paused"


class WorkerState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSING = "pausing"


@dataclass(slots=True, eq=False)
class RequestRecord:
    request: Request
    request_id: str
    arrival_s: float
    deadline_s: float  # arrival_s + ttft_slo_s (after a downgrade, of the new class)
    ttft_slo_s: float
    slo_class: str  # the request's class, or the class it was downgraded to
    prompt_tokens: int
    tiebreak: tuple[int, int]  # (-priority, arrival order): equal keys break on these
    status: RequestStatus = RequestStatus.WAITING
    prefilled_tokens: int = 0  # prompt tokens whose KV exists (chunked prefill)
    executed_s: float = 0.0  # compute spent on it so far (its share of its units)
    worker_id: str | None = None  # worker running it or holding its paused/partial state
    unit_id: int | None = None  # running or paused unit containing it
    queue_token: int = 0  # id of its live queue entry; 0 = not queued; older entries are stale
    queue_late: bool = False  # flowprefill: queued (or last popped) as infeasible
    overtaken: bool = False  # demoted for a tighter class's arrival (overtaking.py), for good
    # Prefix caching (prefix_routing.py): prompt tokens a worker's cache serves - the best
    # worker's on arrival, the chosen worker's once started; never computed, so never priced.
    cached_tokens: int = 0
    # Left queued for a busy worker's cache: preempt no one for it before this time.
    cache_wait_until_s: float = float("-inf")

    @property
    def remaining_tokens(self) -> int:
        """Prompt tokens still to compute."""
        done = (
            self.prefilled_tokens
            if self.prefilled_tokens > self.cached_tokens
            else self.cached_tokens
        )
        return self.prompt_tokens - done


@dataclass(slots=True, eq=False)
class UnitRecord:
    unit: WorkUnit
    tokens: int
    deadlines: tuple[float, ...]  # every member request's deadline, ascending
    ttft_slo_s: float  # of its most urgent request
    tiebreak: tuple[int, int]
    state: UnitState = UnitState.RUNNING
    executed_s: float = 0.0  # compute before the current run (from UnitPaused)
    started_at_s: float = 0.0  # when the current run started or resumed
    kv_bytes: int = 0  # the most it holds on its worker, bytes (kv_memory.py; 0: unbounded)

    @property
    def unit_id(self) -> int:
        return self.unit.unit_id

    @property
    def worker_id(self) -> str:
        return self.unit.worker_id

    @property
    def deadline_s(self) -> float:
        """Its most urgent request's deadline."""
        return self.deadlines[0]

    def due_s(self, now_s: float, remaining_s: float) -> tuple[bool, float]:
        """``(feasible, deadline)`` the unit is ranked by if it (re)starts at ``now_s`` with
        ``remaining_s`` of compute left: the earliest member deadline it can still make, or,
        when it can make none, the latest member deadline.

        Ranking a batch by its most urgent member alone goes wrong once that member is late:
        the whole unit would sink below every feasible request, and members with loose
        targets (batched with it, or paused alongside it) would wait until the queue drained
        and miss deadlines they could have made."""
        for deadline in self.deadlines:
            if deadline - now_s - remaining_s >= 0.0:
                return True, deadline
        return False, self.deadlines[-1]

    def executed_at(self, now_s: float) -> float:
        """Compute seconds spent on this unit by ``now_s`` (pauses excluded)."""
        if self.state is UnitState.PAUSED:
            return self.executed_s
        return self.executed_s + max(now_s - self.started_at_s, 0.0)


@dataclass(slots=True, eq=False)
class WorkerRecord:
    worker_id: str
    state: WorkerState = WorkerState.IDLE
    running: UnitRecord | None = None
    next: UnitRecord | None = None  # one-hop: queued behind its pausing unit (handover.py)
    paused: dict[int, UnitRecord] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)  # chunked: requests whose KV so far is here


@dataclass(frozen=True, slots=True)
class RequestView:
    """A snapshot of one request as the policy sees it."""

    request_id: str
    status: RequestStatus
    deadline_s: float
    executed_s: float
    prefilled_tokens: int
    worker_id: str | None
    unit_id: int | None
    slo_class: str = ""  # the class in force (after a downgrade, the new one)
    ttft_slo_s: float = 0.0  # the TTFT target in force, seconds
