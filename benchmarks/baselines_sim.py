"""FlowPrefill against the strongest baselines and its own ablations, simulated (issue 14, §3).

    .venv/bin/python benchmarks/baselines_sim.py --out docs/results/baselines_sim.json
    .venv/bin/python benchmarks/baselines_sim.py --quick --out results/baselines_quick.json

On the Azure 2023 conv and code traces, priced by the H100 roofline of Llama-3.1-8B, finds the
goodput (highest rate at which >= 90 % of requests meet their TTFT SLO, bisection over the
rate scale as in ``policy_goodput.py``) of

- FlowPrefill as shipped (block granularity);
- every baseline: chunked prefill in EDF order at each ``--chunk-sizes``, chunked FCFS at 512,
  srpf, priority_chunked and edf_giveup at each ``--baseline-chunks``, edf and fcfs (run to
  completion);
- the ablations: FlowPrefill without preemption, with token-bound batching (no alpha check),
  with no batching, and at layer and operator granularity.

Each trace is cut into ``--repeats`` windows of ``--requests`` consecutive requests (window k
starts at request k x requests; classes drawn with seed k; SLO targets = the paper's x the
scale fitted to the window). The summary per (trace, workers) averages goodput over the
windows and divides FlowPrefill's by the best baseline's (the best by mean; the per-window
ratios against each window's own best are given too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from provenance import write_report

from flowprefill_ray.scheduling import PolicyConfig, SLOConfig
from flowprefill_ray.simulator import (
    GoodputSearchConfig,
    RooflineCostModel,
    SimulatorConfig,
    fitted_slo_scale,
    goodput,
)
from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin

FLOWPREFILL = "flowprefill"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/baselines_sim.json")
    p.add_argument("--requests", type=int, default=2000, help="requests per window")
    p.add_argument("--repeats", type=int, default=2, help="windows per trace")
    p.add_argument("--traces", default="azure_2023_conv,azure_2023_code")
    p.add_argument("--workers", default="1,8")
    p.add_argument("--chunk-sizes", default="256,512,1024,2048,4096,8192", help="chunked EDF")
    p.add_argument(
        "--baseline-chunks", default="1024,2048", help="srpf, priority_chunked, edf_giveup"
    )
    p.add_argument("--rel-tol", type=float, default=0.03)
    p.add_argument("--quick", action="store_true", help="500 requests, 1 worker, fewer chunk sizes")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 500)
        args.workers = "1"
        args.chunk_sizes = "512,2048"
        args.baseline_chunks = "1024"
    return args


def configurations(args: argparse.Namespace) -> dict[str, tuple[str, PolicyConfig, str]]:
    """name -> (role: flowprefill | baseline | ablation, policy config, granularity)."""
    out = {FLOWPREFILL: ("flowprefill", PolicyConfig(name="flowprefill"), "block")}
    for size in (int(c) for c in args.chunk_sizes.split(",")):
        cfg = PolicyConfig(name="chunked", chunk_size=size, chunk_order="edf")
        out[f"chunked-edf-{size}"] = ("baseline", cfg, "block")
    out["chunked-fcfs-512"] = ("baseline", PolicyConfig(name="chunked", chunk_size=512), "block")
    for name in ("srpf", "priority_chunked", "edf_giveup"):
        for size in (int(c) for c in args.baseline_chunks.split(",")):
            out[f"{name}-{size}"] = ("baseline", PolicyConfig(name=name, chunk_size=size), "block")
    out["edf"] = ("baseline", PolicyConfig(name="edf"), "block")
    out["fcfs"] = ("baseline", PolicyConfig(name="fcfs"), "block")
    ablations = {
        "fp-no-preemption": (PolicyConfig(preemption=False), "block"),
        "fp-token-bound-batching": (PolicyConfig(batching="token_bound"), "block"),
        "fp-no-batching": (PolicyConfig(batching="off"), "block"),
        "fp-layer": (PolicyConfig(), "layer"),
        "fp-operator": (PolicyConfig(), "operator"),
    }
    for name, (cfg, granularity) in ablations.items():
        out[name] = ("ablation", cfg, granularity)
    return out


def trace_windows(trace: str, requests: int, repeats: int):
    """``repeats`` windows of ``requests`` consecutive requests each, rebased to time 0."""
    full = load_builtin(trace)
    if len(full) < requests * repeats:
        raise SystemExit(f"{trace} has {len(full)} requests, fewer than {requests} x {repeats}")
    for k in range(repeats):
        first = full[k * requests]
        end = k * requests + requests
        end_s = full[end].arrival_s if end < len(full) else full[-1].arrival_s + 1.0
        window = full.window(first.arrival_s, end_s)
        yield k, assign_slo_classes(window.head(requests), SLOAssignmentConfig(seed=k))


def search(workload, pcfg, cost, slo, sim, rel_tol):
    g = goodput(
        workload, pcfg, cost, slo, sim, GoodputSearchConfig(rel_tol=rel_tol, start=sim.num_workers)
    )
    at = g.passing_result
    return {
        "goodput_req_per_s": g.rate_scale * workload.mean_rate_per_s,
        "goodput_rate_scale": g.rate_scale,
        "attainment": at.attainment if at else None,
        "worst_class_attainment": at.worst_class_attainment if at else None,
        "attainment_by_class": at.attainment_by_class() if at else None,
        "preemptions": at.preemptions if at else None,
        "curve": [(p.rate_scale, p.attainment) for p in g.points],
    }


def summarize(trace: str, workers: int, windows: list[dict], roles: dict[str, str]) -> dict:
    names = list(windows[0]["policies"])
    mean = {
        n: statistics.fmean(w["policies"][n]["goodput_req_per_s"] for w in windows) for n in names
    }
    baselines = [n for n in names if roles[n] == "baseline"]
    chunked = [n for n in baselines if n not in ("edf", "fcfs")]
    best = max(baselines, key=mean.get)
    best_chunked = max(chunked, key=mean.get)
    fp = mean[FLOWPREFILL]
    per_window = []
    for w in windows:
        got = {n: w["policies"][n]["goodput_req_per_s"] for n in names}
        own_best = max(baselines, key=got.get)
        per_window.append(
            {"best": own_best, "ratio": got[FLOWPREFILL] / got[own_best] if got[own_best] else None}
        )
    return {
        "trace": trace,
        "workers": workers,
        "mean_goodput_req_per_s": mean,
        "best_baseline": best,
        "flowprefill_over_best": fp / mean[best] if mean[best] else None,
        "best_chunked": best_chunked,
        "flowprefill_over_best_chunked": fp / mean[best_chunked] if mean[best_chunked] else None,
        "per_window_over_own_best": per_window,
        "ablation_over_flowprefill": {
            n: mean[n] / fp if fp else None for n in names if roles[n] == "ablation"
        },
    }


def print_summary(s: dict, roles: dict[str, str]) -> None:
    print(f"\n== {s['trace']}, H100 roofline, {s['workers']} worker(s): mean goodput req/s")
    fp = s["mean_goodput_req_per_s"][FLOWPREFILL]
    for name, value in sorted(s["mean_goodput_req_per_s"].items(), key=lambda kv: -kv[1]):
        ratio = fp / value if value else float("inf")
        print(f"  {name:<26} {roles[name]:<11} {value:9.2f}   flowprefill / it = {ratio:5.2f}x")
    windows = ", ".join(f"{w['ratio']:.2f}x vs {w['best']}" for w in s["per_window_over_own_best"])
    print(
        f"  flowprefill / best baseline ({s['best_baseline']}) = {s['flowprefill_over_best']:.2f}x"
        f" (per window: {windows})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = configurations(args)
    roles = {name: role for name, (role, _, _) in configs.items()}
    cost = RooflineCostModel()
    started = time.perf_counter()
    groups, summaries = [], []
    for trace in args.traces.split(","):
        windows = list(trace_windows(trace, args.requests, args.repeats))
        for workers in (int(w) for w in args.workers.split(",")):
            done = []
            for k, workload in windows:
                slo = SLOConfig(scale=fitted_slo_scale(cost, workload))
                rows = {}
                for name, (_, pcfg, granularity) in configs.items():
                    sim = SimulatorConfig(num_workers=workers, granularity=granularity)
                    rows[name] = search(workload, pcfg, cost, slo, sim, args.rel_tol)
                done.append(
                    {
                        "trace": trace,
                        "window": k,
                        "workers": workers,
                        "requests": len(workload),
                        "trace_rate_req_per_s": workload.mean_rate_per_s,
                        "slo_scale": slo.scale,
                        "classes": workload.slo_classes,
                        "policies": rows,
                    }
                )
                print(f"{trace} window {k}, {workers} worker(s): done", flush=True)
            groups.extend(done)
            summary = summarize(trace, workers, done, roles)
            summaries.append(summary)
            print_summary(summary, roles)
    write_report(
        args.out,
        __file__,
        argv,
        "baselines_sim",
        cost_model=cost.name,
        target_attainment=0.9,
        args=vars(args),
        configurations={
            name: {"role": role, "policy": pcfg.model_dump(exclude_defaults=True), "granularity": g}
            for name, (role, pcfg, g) in configs.items()
        },
        wall_s=time.perf_counter() - started,
        summaries=summaries,
        groups=groups,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
