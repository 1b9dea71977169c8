"""The scheduler's measurements of itself: raw samples for ``stats()`` and the queue gauges.

The samples (seconds) are what the benchmarks compute the scheduler's overhead and the
preemption blocking from; the gauges (requests running, paused and waiting in prefill, per
prefill worker) are counted from the policy's view of the workers and the scheduler's requests.
"""

from __future__ import annotations

from collections import defaultdict, deque

from flowprefill_ray.scheduling.records import WorkerRecord

from .metrics import RuntimeMetrics

# Samples kept for stats(): enough for percentiles of a benchmark run, bounded for a server.
SAMPLES = 20000
# Queue gauges are refreshed at most this often (seconds): counting the queue is O(requests),
# too much to repeat on every event under load, and Prometheus scrapes far less often anyway.
GAUGE_PERIOD_S = 0.1


class SchedulerSamples:
    """Per-event cost and preemption blocking, in seconds, as ``Scheduler.stats`` reports them."""

    def __init__(self) -> None:
        self.event_seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES))
        self.policy_seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES))
        self.blocking_s: deque[float] = deque(maxlen=SAMPLES)
        self.block_in_flight_s: deque[float] = deque(maxlen=SAMPLES)
        # (request id, seconds) from arrival at the scheduler to its first unit computing on
        # its worker, by whether that unit was handed over at a preempted unit's checkpoint
        # or sent to an idle worker.
        self.start_delay_s: dict[str, deque[tuple[str, float]]] = defaultdict(
            lambda: deque(maxlen=SAMPLES)
        )

    def event(self, name: str, started: float, decided: float, finished: float) -> None:
        """One event handled: ``started`` to ``decided`` is the policy, to ``finished`` the
        dispatching too (``time.perf_counter`` readings)."""
        self.event_seconds[name].append(finished - started)
        # The policy's share alone: dispatching is mostly Ray's cost of issuing remote calls.
        self.policy_seconds[name].append(decided - started)

    def preemption(self, blocking_s: float, block_s: float) -> None:
        self.blocking_s.append(blocking_s)
        self.block_in_flight_s.append(block_s)

    def start_delay(self, request_id: str, seconds: float, after_preempt: bool) -> None:
        kind = "after_preempt" if after_preempt else "idle_worker"
        self.start_delay_s[kind].append((request_id, seconds))

    def export(self) -> dict:
        """The samples as lists, under the keys of ``Scheduler.stats``."""
        overhead = {name: list(values) for name, values in self.event_seconds.items()}
        policy_only = {name: list(values) for name, values in self.policy_seconds.items()}
        return {
            "event_overhead_s": overhead,
            "policy_decision_s": policy_only,
            "preemption_blocking_s": list(self.blocking_s),
            # The block each of those preemptions waited for, measured in the worker.
            "preemption_block_in_flight_s": list(self.block_in_flight_s),
            "start_delay_s": {kind: list(v) for kind, v in self.start_delay_s.items()},
        }


class QueueGauges:
    """The prefill queue gauges, refreshed at most every ``GAUGE_PERIOD_S``."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics
        self._at = 0.0

    def refresh(
        self, now: float, workers: dict[str, WorkerRecord], requests: dict[str, object]
    ) -> None:
        """Report the gauges if ``GAUGE_PERIOD_S`` has passed since the last time (``now``:
        a ``time.perf_counter`` reading); ``workers`` is the policy's view of the prefill
        workers, ``requests`` the scheduler's requests in prefill."""
        if now - self._at >= GAUGE_PERIOD_S:
            self._at = now
            self._report(workers, requests)

    def _report(self, workers: dict[str, WorkerRecord], requests: dict[str, object]) -> None:
        in_units = set()
        for wid, worker in workers.items():
            # A unit queued behind a pausing one (one-hop handover) is the one it runs next;
            # the pausing one's requests are not waiting either.
            running = worker.next or worker.running
            held = [u for u in (worker.running, worker.next) if u is not None]
            held.extend(worker.paused.values())
            for unit in held:
                in_units.update(unit.unit.request_ids)
            self._metrics.set(
                "flowprefill_prefill_requests_running",
                len(running.unit.items) if running else 0,
                worker_id=wid,
            )
            self._metrics.set(
                "flowprefill_prefill_requests_paused",
                sum(len(u.unit.items) for u in worker.paused.values()),
                worker_id=wid,
            )
        waiting = sum(1 for rid in requests if rid not in in_units)
        self._metrics.set("flowprefill_prefill_requests_waiting", waiting)
