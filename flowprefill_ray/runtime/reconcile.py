"""Do the scheduler and its prefill workers agree on what each worker holds?

The scheduler decides from its own view (running and paused units per worker); the workers
hold the memory. If the two drift apart, memory leaks where no dashboard shows it (a failed
unit kept as paused on the worker while the scheduler counts 0). ``disagreements`` compares one
``engine.stats()`` answer and names every difference. The calls are not one atomic snapshot,
so a unit that changes state between them can show up once; a difference that persists while
the engine is idle is a real one (tests check exactly that).
"""

from __future__ import annotations


def disagreements(stats: dict) -> list[str]:
    """Differences between the scheduler's and the workers' views in ``stats`` (the dict
    ``FlowPrefillEngine.stats`` returns), one sentence each; empty when they agree."""
    scheduler = stats.get("scheduler", {})
    workers = stats.get("prefill_workers", {})
    found = []
    for wid, worker in workers.items():
        if "error" in worker:
            continue  # a dead worker: the fault handling, not this check, covers it
        if wid not in scheduler.get("prefill_workers", []):
            if worker.get("held_bytes", 0):
                found.append(f"{wid}: holds {worker['held_bytes']} bytes for no scheduler")
            continue
        mine = sorted(scheduler.get("paused_units", {}).get(wid, []))
        theirs = sorted(worker.get("paused_unit_ids", []))
        if mine != theirs:
            found.append(f"{wid}: scheduler sees paused units {mine}, worker holds {theirs}")
        running = scheduler.get("running_units", {}).get(wid)
        if running != worker.get("running_unit"):
            found.append(
                f"{wid}: scheduler sees unit {running} running, worker runs "
                f"{worker.get('running_unit')}"
            )
        if not mine and running is None and not scheduler.get("in_prefill"):
            # Nothing in prefill: only KV on its way to a decode worker may remain, and only
            # while hand-offs are in flight.
            in_flight = sum(
                d.get("in_flight", 0) for d in scheduler.get("decode_load", {}).values()
            )
            if worker.get("paused_bytes", 0) or (worker.get("held_kv_bytes", 0) and not in_flight):
                found.append(
                    f"{wid}: idle, yet holds {worker.get('held_bytes', 0)} bytes "
                    f"({worker.get('ready_kv_requests', 0)} finished KV, "
                    f"{worker.get('partial_kv_requests', 0)} partial KV)"
                )
    return found
