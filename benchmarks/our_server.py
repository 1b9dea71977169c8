"""Our deployment as one system of the peer comparison: its settings and its live counters.

``OurFlags`` is to ``peer_vllm.py`` what ``VllmFlags`` is for vLLM: the settings a comparison
varies on our side, named after them: the prefix cache (issue 18, section 4) and giving up on
late requests (issue 21). ``flowprefill`` serves ``deployments/local.yaml`` as shipped (no
cache), ``flowprefill-prefix`` the same app with each prefill worker's prefix cache on and the
policy pricing requests by their uncached tokens (``prefill.prefix_cache`` and
``policy.prefix``, one block size), ``flowprefill-giveup`` the shipped app with
``policy.late_give_up_factor`` set.

``scheduler_counts`` reads the live scheduler's counters (requests submitted and refused,
prompt tokens the prefix cache served) from the driver that started the app, so a trial can
say how much of its prefill the cache saved and how many requests the policy gave up on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The scheduler counters a trial records, as differences over the trial.
COUNTED = ("submitted", "rejected", "preemptions", "prefix_cache_hit_tokens")
# The policy's own counters recorded the same way (refusals of late requests: give_up.py).
POLICY_COUNTED = ("given_up",)


class OurFlags(BaseModel):
    """Our app's settings a comparison varies. ``prefix_cache``: each prefill worker keeps
    finished prompts' KV in full blocks of ``prefix_block_tokens`` and the policy routes and
    prices by them. ``late_give_up_factor``: ``policy.late_give_up_factor`` (None: as
    shipped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_cache: bool = False
    prefix_block_tokens: int = Field(64, ge=1)
    late_give_up_factor: float | None = Field(None, ge=0.0)
    # Further policy fields merged over the shipped ones (an ablation; {}: as shipped).
    policy: dict[str, Any] = Field(default_factory=dict)
    # The name of a ``--our-variant`` whose fields ``policy`` holds (None: none), so that
    # the shipped app and an ablation of it run side by side under names of their own.
    variant: str | None = None

    @property
    def name(self) -> str:
        name = "flowprefill-prefix" if self.prefix_cache else "flowprefill"
        name = name if self.late_give_up_factor is None else name + "-giveup"
        return name if self.variant is None else f"{name}+{self.variant}"


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
    if flags.late_give_up_factor is not None:
        runtime["policy"] = {**runtime["policy"], "late_give_up_factor": flags.late_give_up_factor}
    runtime["policy"] = {**runtime["policy"], **flags.policy}
    return ServeAppArgs.model_validate(deploy).model_dump(mode="json")


def scheduler_counts(app_args: dict[str, Any]) -> dict[str, int]:
    """The ``COUNTED`` and ``POLICY_COUNTED`` counters of the live scheduler of the app built
    from ``app_args`` (this process must be the Ray driver that started it)."""
    import ray

    from flowprefill_ray.runtime.config import RuntimeConfig

    runtime = RuntimeConfig.model_validate(app_args["runtime"])
    scheduler = ray.get_actor(runtime.scheduler_name, namespace=runtime.namespace)
    stats = ray.get(scheduler.stats.remote(), timeout=60)
    counts = {key: int(stats["counts"].get(key, 0)) for key in COUNTED}
    counts.update({key: int(stats["policy"].get(key, 0)) for key in POLICY_COUNTED})
    return counts


def counts_over(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each counter added between two ``scheduler_counts`` readings. A scheduler that
    restarted in between starts from zero again: its reading is then the whole increase."""
    return {k: after[k] - before[k] if after[k] >= before[k] else after[k] for k in after}
