"""FlowPrefill's slack and priority rule.

``slack = (deadline - now) - max(predicted_remaining - executed, 0)`` (seconds): how long a
request can still wait and make its TTFT deadline. ``priority = sign(slack) / deadline``,
highest first: feasible requests (slack >= 0) run earliest-deadline-first; late ones come after
every feasible one, latest deadline first (they are demoted, not dropped). ``sign(0)`` is taken
as +1: a request that can exactly make it if started now is still feasible.

Policies order with ``rank_key`` (smaller ranks first), which is the same order as
``priority`` (deadlines are positive) but avoids float division and ties exactly on equal
deadlines.
"""

from __future__ import annotations


def slack_s(deadline_s: float, now_s: float, predicted_s: float, executed_s: float = 0.0) -> float:
    """Seconds to spare before the deadline if the remaining work started now."""
    remaining = predicted_s - executed_s
    return (deadline_s - now_s) - (remaining if remaining > 0.0 else 0.0)


def priority(slack: float, deadline_s: float) -> float:
    """The paper's score, ``sign(slack) / deadline`` with ``sign(0) = +1``; larger runs first."""
    return (1.0 if slack >= 0.0 else -1.0) / deadline_s


def rank_key(slack: float, deadline_s: float) -> tuple[int, float]:
    """Sort key equivalent to descending ``priority``: feasible by earliest deadline, then
    infeasible by latest deadline."""
    return (0, deadline_s) if slack >= 0.0 else (1, -deadline_s)
