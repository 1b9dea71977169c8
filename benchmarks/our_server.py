"""Our deployment as one system of the peer comparison: its settings and its live counters.

``OurFlags`` is to ``peer_vllm.py`` what ``VllmFlags`` is for vLLM: the settings a comparison
varies on our side, named after them. Today that is the prefix cache (issue 18, section 4):
``flowprefill`` serves ``deployments/local.yaml`` as shipped (no cache), ``flowprefill-prefix``
the same app with each prefill worker's prefix cache on and the policy pricing requests by
their uncached tokens (``prefill.prefix_cache`` and ``policy.prefix``, one block size).

``scheduler_counts`` reads the live scheduler's counters (requests submitted and refused,
prompt tokens the prefix cache served) from the driver that started the app, so a trial can
say how much of its prefill the cache saved.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The scheduler counters a trial records, as differences over the trial.
COUNTED = ("submitted", "rejected", "preemptions", "prefix_cache_hit_tokens")


class OurFlags(BaseModel):
    """Our app's settings a comparison varies. ``prefix_cache``: each prefill worker keeps
    finished prompts' KV in full blocks of ``prefix_block_tokens`` and the policy routes and
    prices by them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_cache: bool = False
    prefix_block_tokens: int = Field(64, ge=1)

    @property
    def name(self) -> str:
        return "flowprefill-prefix" if self.prefix_cache else "flowprefill"


def our_app_args(slo_scale: float, flags: OurFlags = OurFlags()) -> dict[str, Any]:
    """deployments/local.yaml's app, its four SLO classes at ``slo_scale`` (the client's),
    with ``flags`` applied."""
    from why_late_replay import shipped_args

    from flowprefill_ray.serve.config import ServeAppArgs

    deploy = shipped_args()
    runtime = deploy["runtime"]
    runtime["slo"] = {**runtime["slo"], "scale": slo_scale}
    if flags.prefix_cache:
        block = flags.prefix_block_tokens
        runtime["prefill"] = {
            **runtime["prefill"],
            "prefix_cache": {"enabled": True, "block_tokens": block},
        }
        runtime["policy"] = {
            **runtime["policy"],
            "prefix": {"enabled": True, "block_tokens": block},
        }
    return ServeAppArgs.model_validate(deploy).model_dump(mode="json")


def scheduler_counts(app_args: dict[str, Any]) -> dict[str, int]:
    """The ``COUNTED`` counters of the live scheduler of the app built from ``app_args``
    (this process must be the Ray driver that started it)."""
    import ray

    from flowprefill_ray.runtime.config import RuntimeConfig

    runtime = RuntimeConfig.model_validate(app_args["runtime"])
    scheduler = ray.get_actor(runtime.scheduler_name, namespace=runtime.namespace)
    counts = ray.get(scheduler.stats.remote(), timeout=60)["counts"]
    return {key: int(counts.get(key, 0)) for key in COUNTED}


def counts_over(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each counter added between two ``scheduler_counts`` readings. A scheduler that
    restarted in between starts from zero again: its reading is then the whole increase."""
    return {k: after[k] - before[k] if after[k] >= before[k] else after[k] for k in after}
