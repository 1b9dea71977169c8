"""Policy configuration: which policy, and its knobs. Validated once where it is read."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt

PolicyName = Literal["flowprefill", "fcfs", "chunked", "edf"]


class PolicyConfig(BaseModel):
    """Knobs of every policy; each policy reads the ones that concern it (see the field docs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: PolicyName = "flowprefill"

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
        "this size back to back, with no scheduling decision in between",
    )
    rescore_threshold: NonNegativeFloat = Field(
        0.05,
        description="flowprefill: re-check late (infeasible) requests when the predictor's "
        "online correction has fallen by more than this fraction since the last check",
    )

    # fcfs / edf: run to completion
    max_batch_tokens: PositiveInt = Field(
        2048,
        description="fcfs/edf: queue heads are packed into one unit while the total stays "
        "within this many tokens (a longer head runs alone)",
    )

    # chunked (vLLM / Sarathi-style)
    chunk_size: PositiveInt = Field(512, description="chunked: token budget of one unit")
    chunk_order: Literal["fcfs", "edf"] = Field(
        "fcfs", description="chunked: order in which requests get the next chunk"
    )

    # every policy
    online_correction: bool = Field(
        True, description="feed completed whole-prompt units to the predictor's observe()"
    )
    reject_infeasible: bool = Field(
        False,
        description="admission control: reject on arrival a request whose predicted prefill "
        "alone exceeds its TTFT SLO (it cannot make it even if run at once)",
    )
    retry_after_s: NonNegativeFloat = Field(
        1.0, description="Retry-After hint sent with a rejection, seconds"
    )
