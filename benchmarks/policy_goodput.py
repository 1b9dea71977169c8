"""Goodput of each scheduling policy in the simulator (issue 3, section 8a).

    .venv/bin/python benchmarks/policy_goodput.py --out results/policy_goodput.json
    .venv/bin/python benchmarks/policy_goodput.py --quick          # fewer requests/chunk sizes

For each trace (Azure 2023 conv and code, first ``--requests`` requests, the paper's four SLO
classes assigned by ``assign_slo_classes``), cost model (the tiny model's measured CPU
profile; the H100 roofline of Llama-3.1-8B) and worker count (1, 8), finds each policy's
goodput: the highest rate at which >= 90 % of requests meet their TTFT SLO (bisection over
the trace's rate scale). SLO targets are the paper's (text 0.25 / image 0.5 / search 4 /
file 6 s, set for Llama-3.1-8B on an A800) times a scale fitted to the cost model's speed
(``fitted_slo_scale``). Prints a table with the ratios flowprefill/fcfs and
flowprefill/best chunked, and writes every search point to JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from provenance import command_line

from flowprefill_ray.scheduling import PolicyConfig, SLOConfig
from flowprefill_ray.simulator import (
    GoodputSearchConfig,
    MeasuredCostModel,
    RooflineCostModel,
    SimulatorConfig,
    fitted_slo_scale,
    goodput,
)
from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin


def policies(chunk_sizes: list[int]) -> dict[str, PolicyConfig]:
    out = {
        "flowprefill": PolicyConfig(name="flowprefill"),
        "fcfs": PolicyConfig(name="fcfs"),
        "edf": PolicyConfig(name="edf"),
    }
    for order in ("fcfs", "edf"):
        for size in chunk_sizes:
            out[f"chunked-{order}-{size}"] = PolicyConfig(
                name="chunked", chunk_size=size, chunk_order=order
            )
    return out


def point_digest(point) -> dict:
    r = point.result
    return {
        "rate_scale": point.rate_scale,
        "attainment": r.attainment,
        "worst_class_attainment": r.worst_class_attainment,
        "attainment_by_class": r.attainment_by_class(),
        "ttft_s": r.ttft_percentiles(),
        "preemptions": r.preemptions,
        "mean_blocking_ms": r.mean_blocking_s * 1e3,
        "decisions": r.decisions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/policy_goodput.json")
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests from the start of each trace"
    )
    parser.add_argument("--traces", default="azure_2023_conv,azure_2023_code")
    parser.add_argument("--cost-models", default="tiny_cpu,h100_llama8b")
    parser.add_argument("--workers", default="1,8")
    parser.add_argument("--chunk-sizes", default="256,512,1024,2048")
    parser.add_argument("--granularity", default="block", choices=["block", "layer", "unit"])
    parser.add_argument("--rel-tol", type=float, default=0.03)
    parser.add_argument(
        "--criterion",
        default="overall",
        choices=["overall", "every_class"],
        help="overall: >= 90%% of all requests meet their SLO (DistServe); every_class: of each class",
    )
    parser.add_argument("--quick", action="store_true", help="600 requests, chunk sizes 512,2048")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 600)
        args.chunk_sizes = "512,2048"

    cost_models = {"tiny_cpu": MeasuredCostModel, "h100_llama8b": RooflineCostModel}
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    search = GoodputSearchConfig(rel_tol=args.rel_tol)
    groups = []
    started_all = time.perf_counter()
    for trace in args.traces.split(","):
        workload = assign_slo_classes(
            load_builtin(trace).head(args.requests), SLOAssignmentConfig(seed=0)
        )
        for cm_name in args.cost_models.split(","):
            cost = cost_models[cm_name]()
            slo = SLOConfig(scale=fitted_slo_scale(cost, workload))
            for workers in (int(w) for w in args.workers.split(",")):
                sim = SimulatorConfig(num_workers=workers, granularity=args.granularity)
                rows = {}
                for name, pcfg in policies(chunk_sizes).items():
                    t0 = time.perf_counter()
                    # Start near the load the workers can carry so the bracket is short.
                    g = goodput(
                        workload,
                        pcfg,
                        cost,
                        slo,
                        sim,
                        search.model_copy(update={"start": float(workers)}),
                        args.criterion,
                    )
                    passing = next((p for p in g.points if p.rate_scale == g.rate_scale), None)
                    rows[name] = {
                        "goodput_rate_scale": g.rate_scale,
                        "goodput_req_per_s": g.rate_scale * workload.mean_rate_per_s,
                        "at_goodput": point_digest(passing) if passing else None,
                        "curve": [(p.rate_scale, p.attainment) for p in g.points],
                        "search_wall_s": time.perf_counter() - t0,
                    }
                chunked = {
                    k: v["goodput_req_per_s"] for k, v in rows.items() if k.startswith("chunked")
                }
                best_chunked = max(chunked, key=chunked.get) if chunked else None
                fp = rows["flowprefill"]["goodput_req_per_s"]
                group = {
                    "trace": trace,
                    "requests": len(workload),
                    "trace_rate_req_per_s": workload.mean_rate_per_s,
                    "classes": workload.slo_classes,
                    "cost_model": cost.name,
                    "slo_scale": slo.scale,
                    "workers": workers,
                    "policies": rows,
                    "best_chunked": best_chunked,
                    "flowprefill_over_fcfs": fp / rows["fcfs"]["goodput_req_per_s"]
                    if rows["fcfs"]["goodput_req_per_s"]
                    else None,
                    "flowprefill_over_best_chunked": fp / chunked[best_chunked]
                    if best_chunked and chunked[best_chunked]
                    else None,
                }
                groups.append(group)
                print_group(group, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command_line(__file__, argv),
                "target_attainment": search.target,
                "criterion": args.criterion,
                "granularity": args.granularity,
                "wall_s": time.perf_counter() - started_all,
                "groups": groups,
            },
            indent=1,
        )
    )
    print(f"wrote {out} ({time.perf_counter() - started_all:.0f} s)")
    return 0


def _fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "n/a"


def print_group(group: dict, rows: dict) -> None:
    print(
        f"\n== {group['trace']} ({group['requests']} req, {group['trace_rate_req_per_s']:.2f} req/s), "
        f"{group['cost_model']}, SLO scale {group['slo_scale']:.2f}, {group['workers']} worker(s)"
    )
    print(
        f"{'policy':<22} {'goodput req/s':>13} {'x trace':>8} {'attain':>7} {'worst cls':>9} {'preempt':>8} "
        f"{'text p90 s':>10} {'file p90 s':>10}"
    )
    for name, r in rows.items():
        at = r["at_goodput"]
        if at is None:
            print(f"{name:<22} {0.0:>13.2f} {'-':>8}  (no rate met the target)")
            continue
        ttft = at["ttft_s"]
        print(
            f"{name:<22} {r['goodput_req_per_s']:>13.2f} {r['goodput_rate_scale']:>8.2f} {at['attainment']:>7.3f} "
            f"{at['worst_class_attainment']:>9.3f} {at['preemptions']:>8} {ttft.get('text', {}).get('p90', float('nan')):>10.3f} "
            f"{ttft.get('file', {}).get('p90', float('nan')):>10.3f}"
        )
    print(
        f"flowprefill / fcfs = {_fmt_ratio(group['flowprefill_over_fcfs'])}; flowprefill / best chunked "
        f"({group['best_chunked']}) = {_fmt_ratio(group['flowprefill_over_best_chunked'])}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
