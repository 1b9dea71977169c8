"""Policy ablations on the two-tenant Azure replay, in the simulator (issue 21, section 2).

    .venv/bin/python benchmarks/two_tenant_sim.py --out docs/results/why_late_sim.json \
        --variant 'paper={"late_resume": false}' --variant 'shipped={}'

The same two tenants as ``benchmarks/why_late_replay.py``: the Azure 2023 conversation trace
as ``urgent`` (6 s TTFT) and the code trace as ``relaxed`` (23.2 s), prompts scaled by
``--prompt-scale`` and capped, priced by the committed SmolLM2 CPU profile. Units run
``exp(N(0, --sigma))`` times their profiled cost (``NoisyCostModel``, one seeded draw per
forward): the predictor is fitted to the noiseless profile, so units overrun and underrun
their prediction as they do live, and "batch overran" shows up as it does there.

For each ``--variant NAME=JSON`` (fields merged into the shipped policy of
``deployments/local.yaml``) and each noise seed: the goodput (highest rate scale with >= 90 %
attainment, overall and in every class: the bisection of ``simulator.goodput``) and, at each
``--rate`` scale, attainment per tenant and the why-late table of the simulated timeline.
Prints a table; writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cli_json import parse_variants
from provenance import write_report

REPO = Path(__file__).resolve().parent.parent
# The two tenants and the Azure 2023 trace each replays (as benchmarks/why_late_replay.py).
TENANT_TRACES = {"urgent": "azure_2023_conv", "relaxed": "azure_2023_code"}
# SmolLM2-135M on one CPU thread: the model deployments/local.yaml serves.
PROFILE = REPO / "flowprefill_ray" / "simulator" / "profiles" / "smollm2_cpu.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], help="NAME=JSON policy fields")
    p.add_argument("--requests", type=int, default=2000, help="first N requests of the merge")
    p.add_argument("--prompt-scale", type=float, default=0.1)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument(
        "--tenants",
        default=",".join(TENANT_TRACES),
        help="tenants kept from the merged trace ('urgent' alone: what the urgent tenant's "
        "own load allows, the same requests at the same instants)",
    )
    p.add_argument("--urgent-slo", type=float, default=6.0)
    p.add_argument("--relaxed-slo", type=float, default=23.2)
    p.add_argument("--sigma", type=float, default=0.15, help="log-sd of the unit cost noise")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds per variant")
    p.add_argument("--rate", type=float, action="append", default=[], help="fixed rate scales")
    p.add_argument("--unit-overhead-s", type=float, default=0.01)
    p.add_argument("--response-overhead-s", type=float, default=0.05)
    p.add_argument("--no-goodput", action="store_true", help="only the fixed rates")
    p.add_argument("--out", default="results/two_tenant_sim.json")
    args = p.parse_args(argv)
    args.tenants = [t for t in args.tenants.split(",") if t]
    unknown = [t for t in args.tenants if t not in TENANT_TRACES]
    if unknown or not args.tenants:
        p.error(f"--tenants takes some of {', '.join(TENANT_TRACES)}, got {unknown or 'none'}")
    return args


def shipped_policy() -> dict[str, Any]:
    import yaml

    text = (REPO / "deployments" / "local.yaml").read_text()
    return yaml.safe_load(text)["applications"][0]["args"]["runtime"]["policy"]


def two_tenant_workload(args: argparse.Namespace):
    """The merged, prompt-scaled trace (first ``--requests`` requests, then only
    ``--tenants``), rate scale 1."""
    from flowprefill_ray.workloads import load_builtin, merge_tenants

    merged = merge_tenants(
        [(load_builtin(trace), tenant) for tenant, trace in TENANT_TRACES.items()]
    ).head(args.requests)
    cap = args.max_prompt_tokens

    def scaled(n: int) -> int:
        return max(1, min(cap, math.ceil(n * args.prompt_scale)))

    records = tuple(
        replace(r, prompt_tokens=scaled(r.prompt_tokens))
        for r in merged
        if r.slo_class in args.tenants
    )
    name = f"{merged.name}, prompts x{args.prompt_scale:g}<= {cap}"
    if set(args.tenants) != set(TENANT_TRACES):
        name += f", only {','.join(args.tenants)}"
    return type(merged)(name, records)


def run_once(workload, policy: dict, args: argparse.Namespace, seed: int, timeline: bool):
    from flowprefill_ray.scheduling import PolicyConfig, make_policy
    from flowprefill_ray.scheduling.slo import SLOConfig
    from flowprefill_ray.scheduling.timeline import Timeline
    from flowprefill_ray.simulator import (
        MeasuredCostModel,
        MeasuredProfile,
        NoisyCostModel,
        Simulator,
    )
    from flowprefill_ray.simulator import SimulatorConfig as SimConfig
    from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy

    base = MeasuredCostModel(MeasuredProfile.load(PROFILE))
    slo = SLOConfig(
        classes=[
            {"name": "urgent", "ttft_slo_s": args.urgent_slo, "tpot_slo_s": 0.5},
            {"name": "relaxed", "ttft_slo_s": args.relaxed_slo, "tpot_slo_s": 0.5},
        ],
        default_class="urgent",
    )
    predictor = fresh_copy(_fitted(base, fit_predictor))
    config = PolicyConfig.model_validate(policy)
    pol = make_policy(config, predictor, slo=slo)
    tl = Timeline(predictor.predict, capacity=len(workload) + 10) if timeline else None
    sim = Simulator(
        pol,
        NoisyCostModel(base, args.sigma, seed=seed),
        SimConfig(
            unit_overhead_s=args.unit_overhead_s, response_overhead_s=args.response_overhead_s
        ),
        timeline=tl,
    )
    return sim.run(workload.to_requests(slo)), tl


_FITTED: dict[str, Any] = {}


def _fitted(base, fit):
    # The profile fit is the same for every run; fit once.
    if "p" not in _FITTED:
        _FITTED["p"] = fit(base)
    return _FITTED["p"]


def goodput_of(workload, policy: dict, args, seed: int, every_class: bool) -> float:
    from flowprefill_ray.simulator import GoodputSearchConfig, find_goodput

    found = find_goodput(
        lambda scale: run_once(workload.scale_rate(scale), policy, args, seed, False)[0],
        GoodputSearchConfig(start=0.5, rel_tol=0.02),
        measure=(lambda r: r.worst_class_attainment) if every_class else None,
    )
    return found.rate_scale


def main(argv: list[str] | None = None) -> int:
    from flowprefill_ray.scheduling.why_late import summarize, why_late

    args = parse_args(argv)
    variants = parse_variants(args.variant) or {"shipped": {}}
    workload = two_tenant_workload(args)
    base_rate = workload.mean_rate_per_s
    out: dict[str, Any] = {}
    for name, extra in variants.items():
        policy = {**shipped_policy(), **extra}
        row: dict[str, Any] = {"policy": policy, "seeds": {}}
        for seed in range(args.seeds):
            entry: dict[str, Any] = {}
            if not args.no_goodput:
                entry["goodput_overall_scale"] = goodput_of(workload, policy, args, seed, False)
                entry["goodput_every_class_scale"] = goodput_of(workload, policy, args, seed, True)
            for scale in args.rate:
                result, tl = run_once(workload.scale_rate(scale), policy, args, seed, True)
                export = tl.export(last=None)
                verdicts = why_late(export)
                urgent_feasible = {}
                for v in verdicts:
                    if v["slo_class"] == "urgent" and v["cause"] != "infeasible_at_arrival":
                        urgent_feasible[v["cause"]] = urgent_feasible.get(v["cause"], 0) + 1
                entry[f"x{scale:g}"] = {
                    "attainment": result.attainment,
                    "by_class": result.attainment_by_class(),
                    "ttft_s": result.ttft_percentiles(),
                    "preemptions": result.preemptions,
                    "why_late": summarize(export, verdicts)["rows"],
                    "urgent_feasible_misses": urgent_feasible,
                }
            row["seeds"][seed] = entry
        out[name] = row
        print_variant(name, row, args)
    write_report(
        args.out,
        __file__,
        argv,
        "two_tenant_sim",
        workload={
            "name": workload.name,
            "requests": len(workload),
            "rate_rps_at_scale_1": base_rate,
            "classes": workload.slo_classes,
        },
        args=vars(args),
        variants=out,
    )
    return 0


def print_variant(name: str, row: dict, args: argparse.Namespace) -> None:
    seeds = list(row["seeds"].values())
    parts = [f"{name:<14}"]
    if not args.no_goodput:
        for key in ("goodput_overall_scale", "goodput_every_class_scale"):
            values = [s[key] for s in seeds]
            parts.append(
                f"{key[8:-6]} x{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
            )
    for scale in args.rate:
        at = [s[f"x{scale:g}"] for s in seeds]
        urgent = statistics.mean(a["by_class"].get("urgent", 1.0) for a in at)
        relaxed = statistics.mean(a["by_class"].get("relaxed", 1.0) for a in at)
        feasible = sum(sum(a["urgent_feasible_misses"].values()) for a in at)
        parts.append(
            f"x{scale:g}: urgent {urgent:.3f} relaxed {relaxed:.3f} urgent-feasible-misses {feasible}"
        )
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
