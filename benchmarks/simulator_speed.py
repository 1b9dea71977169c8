"""How fast the simulator replays a trace: a one-hour trace on 8 workers should take < 60 s.

    .venv/bin/python benchmarks/simulator_speed.py --out results/simulator_speed.json

Replays the full hour of the Azure 2023 conversation trace (four SLO classes assigned) on
8 simulated workers, for each policy, in two scenarios:

- ``native``: the trace at its own rate (one hour of simulated time) priced by the measured
  tiny-CPU profile;
- ``loaded``: the H100 roofline of Llama-3.1-8B with the trace compressed until the workers
  are ``--utilisation`` busy on average (the same requests in less simulated time, with
  queues, preemptions and more scheduling work per request).

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from provenance import command_line

from flowprefill_ray.scheduling import PolicyConfig, SLOConfig
from flowprefill_ray.simulator import (
    MeasuredCostModel,
    RooflineCostModel,
    SimulatorConfig,
    fitted_slo_scale,
    prefill_s,
    simulate,
)
from flowprefill_ray.workloads import assign_slo_classes, load_builtin

TARGET_WALL_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/simulator_speed.json")
    parser.add_argument("--trace", default="azure_2023_conv")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--utilisation", type=float, default=0.8, help="mean offered load per worker (0..1)"
    )
    parser.add_argument("--policies", default="flowprefill,fcfs,edf,chunked")
    args = parser.parse_args(argv)

    workload = assign_slo_classes(load_builtin(args.trace))
    rows = []
    for scenario, cost in (("native", MeasuredCostModel()), ("loaded", RooflineCostModel())):
        if scenario == "native":
            scale = 1.0
        else:
            mean_prefill = statistics.fmean(prefill_s(cost, r.prompt_tokens) for r in workload)
            scale = args.utilisation * args.workers / (workload.mean_rate_per_s * mean_prefill)
        slo = SLOConfig(scale=fitted_slo_scale(cost, workload))
        scaled = workload.scale_rate(scale)
        for name in args.policies.split(","):
            started = time.perf_counter()
            result = simulate(
                scaled,
                PolicyConfig(name=name),
                cost,
                slo,
                SimulatorConfig(num_workers=args.workers),
            )
            wall = time.perf_counter() - started
            rows.append(
                {
                    "scenario": scenario,
                    "cost_model": cost.name,
                    "rate_scale": scale,
                    "slo_scale": slo.scale,
                    "policy": name,
                    "requests": len(scaled),
                    "simulated_s": result.makespan_s,
                    "events": result.events,
                    "wall_s": wall,
                    "events_per_s": result.events / wall,
                    "utilisation": result.summary()["utilisation"],
                    "attainment": result.attainment,
                    "preemptions": result.preemptions,
                    "meets_target": wall < TARGET_WALL_S,
                }
            )

    print(
        f"trace {args.trace}: {len(workload)} requests over {workload.duration_s:.0f} s, {args.workers} workers"
    )
    print(
        f"{'scenario':<8} {'policy':<12} {'rate x':>7} {'sim s':>7} {'util':>5} {'events':>7} {'wall s':>7} "
        f"{'events/s':>9} {'attain':>7} {'preempt':>8}"
    )
    for r in rows:
        print(
            f"{r['scenario']:<8} {r['policy']:<12} {r['rate_scale']:>7.2f} {r['simulated_s']:>7.0f} "
            f"{r['utilisation']:>5.2f} {r['events']:>7} {r['wall_s']:>7.2f} {r['events_per_s']:>9.0f} "
            f"{r['attainment']:>7.3f} {r['preemptions']:>8}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command_line(__file__, argv),
                "trace": args.trace,
                "workers": args.workers,
                "target_wall_s": TARGET_WALL_S,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0 if all(r["meets_target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
