"""SLO-aware batching (FLOWPREFILL.md): which waiting requests join a new head's unit.

Batching is tried only when the head is new, has at most ``token_bound`` tokens and still has
at least ``alpha x its TTFT SLO`` of time before its deadline. Waiting requests are then taken
in priority order; a request joins when it has at most ``token_bound`` tokens, the batch total
stays within ``token_bound`` and its KV fits in the worker's free bytes (``kv_memory.py``). The scan stops before
the first request whose addition would leave the head less than ``alpha x SLO`` of time:
``(deadline_head - now) - predict(batch_tokens) x overrun < alpha * slo_head``, where
``overrun`` is the predictor's recent 90th-percentile actual/predicted ratio (at least 1;
1 without online correction or with ``batch_error_margin`` off). At most
``batch_scan_limit`` requests are examined, so the work per event stays bounded; requests
over ``token_bound`` tokens are not examined at all (the queue keeps them apart).

Two ablations (``PolicyConfig.batching``): ``token_bound`` packs the same way with neither
alpha check (a plain token-bound batch in priority order), ``off`` runs every head alone.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import PolicyConfig
from .events import WorkItem
from .kv_memory import UnitRoom
from .predictor import TTFTPredictor
from .queues import SlackQueue
from .records import RequestRecord


def form_slo_batch(
    head: RequestRecord,
    queue: SlackQueue,
    predictor: TTFTPredictor,
    config: PolicyConfig,
    room: UnitRoom,
    now: float,
    uncached: Callable[[RequestRecord], int] = lambda rec: rec.remaining_tokens,
) -> list[WorkItem]:
    """Items of the unit headed by ``head`` (already popped from ``queue``); members are popped
    from ``queue``, examined non-members are put back. ``room``: the worker's free KV bytes,
    the head's already taken; each member takes its own. ``uncached(rec)`` is what ``rec``
    would compute on that worker (its remaining tokens less what the worker's prefix cache
    holds)."""
    items = [WorkItem(head.request_id, head.prefilled_tokens, head.prompt_tokens)]
    bound = config.token_bound
    total = uncached(head)
    time_left = head.deadline_s - now
    margin = config.alpha * head.ttft_slo_s
    # Units overrun their prediction now and then (noise, decode sharing the cores): price
    # the batch as the recent 1-in-10 overrun would, so such an overrun still leaves the head
    # its margin (``PolicyConfig.batch_error_margin``).
    inflate = (
        predictor.overrun_ratio if config.batch_error_margin and config.online_correction else 1.0
    )
    slo_aware = config.batching == "slo"
    if config.batching == "off" or head.prefilled_tokens != 0 or total > bound:
        return items
    if slo_aware and time_left < margin:
        return items
    examined: list[RequestRecord] = []
    for _ in range(config.batch_scan_limit):
        if total >= bound:
            break
        rec = queue.pop_small(now)  # larger requests could never join
        if rec is None:
            break
        examined.append(rec)
        tokens = uncached(rec)
        new_total = total + tokens
        item = WorkItem(rec.request_id, rec.prefilled_tokens, rec.prompt_tokens)
        if new_total > bound or not room.fits(item):
            continue
        if slo_aware and time_left - predictor.predict(new_total) * inflate < margin:
            break
        room.take(item)
        items.append(item)
        examined.pop()
        total = new_total
    for rec in examined:
        queue.unpop(rec)
    return items
