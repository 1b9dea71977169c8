"""Policy configuration: which policy, and its knobs. Validated once where it is read."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    model_validator,
)

from .admission import AdmissionConfig
from .prefix_routing import PrefixRoutingConfig

PolicyName = Literal[
    "flowprefill", "fcfs", "chunked", "edf", "srpf", "priority_chunked", "edf_giveup"
]

# Keys that moved into ``admission`` (kept here only to name the new place in the error).
_MOVED_TO_ADMISSION = {
    "reject_infeasible": "admission: {action: reject, estimate: alone}",
    "retry_after_s": "admission: {retry_after_s: ...}",
}
# Keys replaced by the byte budgets of kv_memory.py, with what replaces them.
_REPLACED = {
    "paused_token_budget": "the paused-prefill budget is now bytes, a share of each worker's "
    "measured KV memory: set prefill.kv_memory.paused_kv_fraction (runtime) or "
    "SimulatorConfig.kv_budget (simulator) instead",
}


class PolicyConfig(BaseModel):
    """Knobs of every policy; each policy reads the ones that concern it (see the field docs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: PolicyName = "flowprefill"

    @model_validator(mode="before")
    @classmethod
    def _name_moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"{k} -> {v}" for k, v in _MOVED_TO_ADMISSION.items() if k in data]
            if moved:
                raise ValueError("policy keys moved into 'admission': " + "; ".join(moved))
            for key, instead in _REPLACED.items():
                if key in data:
                    raise ValueError(f"policy.{key} was removed: {instead}")
        return data

    # flowprefill: SLO-aware batching (FLOWPREFILL.md)
    token_bound: PositiveInt = Field(
        2048,
        description="flowprefill: a batch head, each batch member and the batch total stay "
        "within this many tokens",
    )
    alpha: NonNegativeFloat = Field(
        0.1,
        description="flowprefill: batch only while the head keeps alpha x its TTFT SLO of time",
    )
    batch_scan_limit: PositiveInt = Field(
        32,
        description="flowprefill: most waiting requests examined when filling one batch "
        "(bounds the work per event; the release scans the whole queue)",
    )
    long_chunk_tokens: PositiveInt = Field(
        8192,
        description="flowprefill/fcfs/edf: a worker runs prompts longer than this as chunks of "
        "this size back to back, with no scheduling decision in between (a paused unit keeps "
        "the activations of one such chunk: kv_memory.py)",
    )
    handover: Literal["one_hop", "after_pause"] = Field(
        "one_hop",
        description="flowprefill: one_hop sends the unit that replaces a preempted one with "
        "the preemption (the worker switches at its checkpoint, no further call); after_pause "
        "decides it when the pause is reported (one more scheduler-worker round trip)",
    )
    preemption: bool = Field(
        True,
        description="flowprefill: whether waiting work may preempt a running unit (off: an "
        "ablation; units then run to completion, ranked and batched as usual)",
    )
    late_grace: bool = Field(
        False,
        description="flowprefill, with online_correction: a unit that has already run part "
        "of its prefill counts as able to make a deadline while it could at the predictor's "
        "recent 10th-percentile actual/predicted ratio, and is demoted as late only past "
        "that (off: at the prediction itself)",
    )
    overrun_grace: bool = Field(
        True,
        description="flowprefill, with online_correction: a running unit past its prediction "
        "but within the predictor's recent 90th-percentile overrun is preempted only for a "
        "newcomer that would miss waiting out the rest of that band (off: an ablation; its "
        "predicted remaining is then 0 and its slack decides)",
    )
    batching: Literal["slo", "token_bound", "off"] = Field(
        "slo",
        description="flowprefill: how a new head's unit is filled (batching.py): 'slo' "
        "SLO-aware batching; 'token_bound' packs waiting requests in priority order up to "
        "token_bound with no check of the head's time left; 'off' runs every request alone "
        "(the last two are ablations)",
    )
    rescore_threshold: NonNegativeFloat = Field(
        0.05,
        description="flowprefill/edf_giveup: re-check late (infeasible) requests when the "
        "predictor's online correction has fallen by more than this fraction since the last "
        "check",
    )

    # fcfs / edf: run to completion
    max_batch_tokens: PositiveInt = Field(
        2048,
        description="fcfs/edf: queue heads are packed into one unit while the total stays "
        "within this many tokens (a longer head runs alone)",
    )

    # chunked (vLLM / Sarathi-style) and the chunked baselines srpf, priority_chunked, edf_giveup
    chunk_size: PositiveInt = Field(
        512, description="chunked/srpf/priority_chunked/edf_giveup: token budget of one unit"
    )
    chunk_order: Literal["fcfs", "edf"] = Field(
        "fcfs",
        description="chunked: order in which requests get the next chunk (the other chunked "
        "policies have their own order)",
    )

    # every policy
    late_give_up_factor: NonNegativeFloat | None = Field(
        None,
        description="refuse (HTTP 429 with Retry-After) a request that still has no first "
        "token this many times its TTFT target after its deadline, if it is queued or in a "
        "paused unit whose every member is that late (give_up.py); None = never: late "
        "requests wait behind all feasible work for as long as that takes (the paper)",
    )
    online_correction: bool = Field(
        True, description="feed completed whole-prompt units to the predictor's observe()"
    )
    learn_unit_overhead: bool = Field(
        True,
        description="with online_correction: learn each unit's wall time beyond its compute "
        "(a live runtime's dispatch and report round trips) and add it to every prediction",
    )
    batch_error_margin: bool = Field(
        True,
        description="with online_correction: SLO-aware batching prices a candidate batch at "
        "its prediction times the 90th percentile of recent units' actual/predicted compute "
        "(at least 1), so a batch that overruns as often as one in ten still leaves its head "
        "alpha x SLO",
    )
    prefix: PrefixRoutingConfig = Field(
        default_factory=PrefixRoutingConfig,
        description="prefix caching: price requests by uncached tokens, route by cache contents "
        "(see prefix_routing.py)",
    )
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig,
        description="admission control on arrival: waiting-queue bound and what to do with "
        "a request predicted to miss its TTFT SLO (see admission.py)",
    )
