"""What the simulated cluster is: workers, preemption granularity, serving overheads, caches."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flowprefill_ray.scheduling.kv_memory import KVBudget

from .cost_model import Granularity


class SimulatorConfig(BaseModel):
    """``num_workers`` prefill workers; preemption stops at ``granularity`` checkpoints;
    ``resume_overhead_s`` seconds are paid each time a paused unit restarts.

    Two optional terms stand for the serving stack around the model, so a simulation can be
    compared with a live deployment (``benchmarks/sim_compare.py`` measures them from one):
    ``unit_overhead_s`` keeps a worker busy without compute at the start of every run of a unit
    (the scheduler's call to the worker and the reply: the worker idles between units for that
    long), ``response_overhead_s`` is added to every first token's time (HTTP, the Serve
    replica, hand-off to the engine: on the request's path, not the worker's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(default=1, gt=0)
    granularity: Granularity = "block"
    resume_overhead_s: float = Field(default=0.0, ge=0)
    unit_overhead_s: float = Field(default=0.0, ge=0)
    response_overhead_s: float = Field(default=0.0, ge=0)
    max_forward_tokens: int = Field(
        default=8192, gt=0, description="longest piece of one prompt run in one forward (tokens)"
    )
    worker_prefix: str = "prefill-"
    prefix_cache_blocks: int = Field(
        default=0,
        ge=0,
        description="blocks of finished prompts each worker's prefix cache keeps (LRU); "
        "0 = no prefix cache",
    )
    prefix_block_tokens: int = Field(
        default=512, gt=0, description="tokens per cached block (Mooncake traces: 512)"
    )
    kv_budget: KVBudget | None = Field(
        default=None,
        description="what each simulated worker may hold in KV and paused state, bytes "
        "(KVBudget.of_tokens counts tokens instead); None = unbounded, as no simulated "
        "result before budgets existed assumed any",
    )
    max_events: int = Field(
        default=50_000_000, gt=0, description="guard against a livelocked policy"
    )
