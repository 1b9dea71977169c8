"""Prefix caching in the simulator: FlowPrefill's goodput without a cache, and with one under
each routing choice (issue 18, section 4).

    .venv/bin/python benchmarks/prefix_routing_sim.py --out docs/results/prefix_routing_sim.json

Two workloads, each with two repeats (trace windows / generator seeds):

- ``mooncake``: the Mooncake synthetic trace (512-token blocks, ~64 % of blocks repeat an
  earlier prefix), two halves of its 1,022 s, paper SLO classes given by prompt length
  (``assign_slo_classes``), targets x``--mooncake-slo-scale``;
- ``multiturn``: generated chat conversations (``workloads/multiturn.py``): each turn's prompt
  is the previous one plus its answer and a new question, all conversations share the system
  prompt; two seeds.

Llama-3.1-8B on ``--workers`` simulated H100s (roofline). Each worker's cache holds
``--cache-tokens`` tokens of finished prompts (LRU by block); the policy's view has the same
size. Goodput: the highest rate scale with >= 90 % attainment (``simulator.goodput``), in
requests/s. Prints a table; writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from provenance import write_report

ROUTINGS = ("least_loaded", "random", "cache_only", "cache_aware")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument(
        "--cache-tokens",
        type=int,
        action="append",
        help="cache size per worker, tokens; repeatable (default: 200,000 ~ 26 GB of bf16 KV "
        "in GPU memory, and 2,000,000 ~ 260 GB, a host-memory tier)",
    )
    p.add_argument("--mooncake-slo-scale", type=float, default=2.0)
    p.add_argument("--multiturn-slo-scale", type=float, default=1.0)
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="a small slice of each, for a smoke run")
    p.add_argument("--out", default="results/prefix_routing_sim.json")
    return p.parse_args(argv)


def workloads(args: argparse.Namespace) -> dict[str, list[tuple[str, Any, float]]]:
    """Workload name -> [(repeat label, workload, SLO scale)]."""
    from flowprefill_ray.workloads import load_builtin
    from flowprefill_ray.workloads.multiturn import MultiTurnConfig, multiturn_workload
    from flowprefill_ray.workloads.slo_assignment import assign_slo_classes

    trace = assign_slo_classes(load_builtin("mooncake_synthetic"))
    half = trace.duration_s / 2
    windows = [("0-50%", trace.window(0, half)), ("50-100%", trace.window(half, trace.duration_s))]
    if args.quick:
        windows = [(label, w.head(300)) for label, w in windows]
    chats = []
    for seed in (0, 1):
        config = MultiTurnConfig(
            conversations=60 if args.quick else args.conversations,
            turns=args.turns,
            system_prompt_tokens=1024,
            question_tokens=256,
            answer_tokens=256,
            think_time_s=20.0,
            conversation_interval_s=0.5,
            block_tokens=64,
            seed=seed,
        )
        chats.append((f"seed {seed}", assign_slo_classes(multiturn_workload(config))))
    return {
        "mooncake": [(label, w, args.mooncake_slo_scale) for label, w in windows],
        "multiturn": [(label, w, args.multiturn_slo_scale) for label, w in chats],
    }


def variants(cache_tokens: list[int]) -> dict[str, tuple[dict | None, int]]:
    """Variant name -> (``policy.prefix`` or None for no cache, cache tokens per worker)."""
    out: dict[str, tuple[dict | None, int]] = {"no cache": (None, 0)}
    for tokens in cache_tokens:
        for routing in ROUTINGS:
            out[f"{routing} {tokens // 1000}k"] = ({"enabled": True, "routing": routing}, tokens)
    return out


@dataclass(slots=True)
class CachedRun:
    """One simulation of the goodput search: its attainment (what the search compares) and the
    cache's share of the prompt tokens at that rate."""

    attainment: float
    hit_token_fraction: float | None
    recomputed_token_fraction: float | None


def run_variant(
    workload, block_tokens: int, prefix: dict | None, cache_tokens: int, slo_scale, args
):
    """Goodput of one variant, and its attainment and cache hits at that rate: all from the
    search's own simulations (the passing one at the goodput), none run again."""
    from flowprefill_ray.scheduling import PolicyConfig, SLOConfig, make_policy
    from flowprefill_ray.simulator import (
        H100_SXM,
        GoodputSearchConfig,
        RooflineConfig,
        RooflineCostModel,
        Simulator,
        SimulatorConfig,
        find_goodput,
    )
    from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy

    cost = RooflineCostModel(RooflineConfig(gpu=H100_SXM))
    blocks = cache_tokens // block_tokens
    if prefix is None:
        policy = PolicyConfig()
        sim_config = SimulatorConfig(num_workers=args.workers)
    else:
        prefix = {**prefix, "block_tokens": block_tokens, "worker_capacity_blocks": blocks}
        policy = PolicyConfig(prefix=prefix)
        sim_config = SimulatorConfig(
            num_workers=args.workers, prefix_cache_blocks=blocks, prefix_block_tokens=block_tokens
        )
    # The workload's own SLO scale prices every run, the cache statistics' included.
    slo = SLOConfig(scale=slo_scale)
    predictor = fit_predictor(cost, sim_config.max_forward_tokens)
    total_tokens = sum(r.prompt_tokens for r in workload)

    def run_at(scale: float) -> CachedRun:
        requests = workload.scale_rate(scale).to_requests(slo)
        sim = Simulator(make_policy(policy, fresh_copy(predictor), slo=slo), cost, sim_config)
        result = sim.run(requests)
        if prefix is None:
            return CachedRun(result.attainment, None, None)
        caches = sim.prefix_caches
        return CachedRun(
            result.attainment,
            caches.hit_tokens / total_tokens,
            caches.recomputed_tokens / total_tokens,
        )

    found = find_goodput(run_at, GoodputSearchConfig(rel_tol=0.02))
    at_goodput = found.passing_result
    entry = {
        "goodput_rate_scale": found.rate_scale,
        "goodput_rps": found.rate_scale * workload.mean_rate_per_s,
        "attainment_at_goodput": at_goodput.attainment if at_goodput else None,
        "curve": [(p.rate_scale, p.attainment) for p in found.points],
    }
    if prefix is not None:
        entry["hit_token_fraction"] = at_goodput.hit_token_fraction if at_goodput else None
        entry["recomputed_token_fraction"] = (
            at_goodput.recomputed_token_fraction if at_goodput else None
        )
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_tokens = args.cache_tokens or [200_000, 2_000_000]
    results: dict[str, Any] = {}
    for name, repeats in workloads(args).items():
        rows: dict[str, Any] = {}
        for variant, (prefix, tokens) in variants(args.cache_tokens).items():
            per_repeat = {}
            for label, workload, slo_scale in repeats:
                block = workload.block_tokens
                per_repeat[label] = run_variant(workload, block, prefix, tokens, slo_scale, args)
            goodputs = [e["goodput_rps"] for e in per_repeat.values()]
            rows[variant] = {
                "cache_tokens_per_worker": tokens,
                "repeats": per_repeat,
                "goodput_rps_mean": statistics.mean(goodputs),
            }
        base = rows["no cache"]["goodput_rps_mean"]
        for row in rows.values():
            row["vs_no_cache"] = row["goodput_rps_mean"] / base if base else None
        results[name] = {
            "repeats": [
                {
                    "label": label,
                    "requests": len(w),
                    "rate_rps_at_scale_1": w.mean_rate_per_s,
                    "block_tokens": w.block_tokens,
                    "slo_scale": scale,
                }
                for label, w, scale in repeats
            ],
            "variants": rows,
        }
        print_table(name, rows)
    write_report(
        args.out,
        __file__,
        argv,
        "prefix_routing_sim",
        args=vars(args),
        workloads=results,
    )
    return 0


def print_table(name: str, rows: dict[str, Any]) -> None:
    print(f"\n{name}: goodput (req/s, >= 90 % attainment), per repeat and mean")
    print(f"{'variant':<18} {'repeats':<24} {'mean':>8} {'vs none':>8} {'hit tokens':>11}")
    for variant, row in rows.items():
        reps = " ".join(f"{e['goodput_rps']:.2f}" for e in row["repeats"].values())
        hits = [e.get("hit_token_fraction") for e in row["repeats"].values()]
        hit = f"{statistics.mean(hits):.1%}" if None not in hits else "-"
        print(
            f"{variant:<18} {reps:<24} {row['goodput_rps_mean']:>8.2f} "
            f"{row['vs_no_cache']:>7.2f}x {hit:>11}"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
