"""Admission control at about 3x capacity, in the simulator.

    .venv/bin/python benchmarks/admission_overload.py --out results/admission_overload.json

The scenario of ``flowprefill_ray/simulator/overload.py`` (the one tests/test_admission.py
checks): two prefill workers serving 10 requests/s, Poisson arrivals at ``--rate`` (30/s: 3x),
classes in turn text / image / search / file at ``--slo-scale`` (2) times the paper's targets
(0.5 / 1 / 8 / 12 s). Each policy runs under each admission
setting, for ``--requests`` arrivals and for twice as many (to see whether the queue grows
with the length of the overload).

Columns: ``attain`` = fraction of all requests that met their ORIGINAL target (rejected ones
count as misses); ``in_force`` = the same against the target after admission (a downgraded
request against its looser class); ``admitted`` = among admitted requests, the fraction that
met the target in force; ``peak_wait`` = most requests the policy held WAITING at once.
"""

from __future__ import annotations

import argparse

from provenance import write_report

from flowprefill_ray.scheduling import AdmissionConfig, SLOConfig
from flowprefill_ray.simulator.experiment import fit_predictor
from flowprefill_ray.simulator.overload import (
    linear_cost_model,
    overload_requests,
    simulate_admission,
)

SETTINGS = {
    "admit": AdmissionConfig(action="admit"),
    "reject/alone": AdmissionConfig(action="reject", estimate="alone"),
    "reject/queue-unprotected": AdmissionConfig(
        action="reject", estimate="queue", protect_admitted=False
    ),
    "reject/queue": AdmissionConfig(action="reject", estimate="queue"),
    "downgrade/queue": AdmissionConfig(action="downgrade", estimate="queue"),
    # The shipped configs' margin (deployments/*.yaml): what it costs where predictions are
    # exact (here), against what it buys live (tests/test_overload.py, RELIABILITY.md).
    "reject/queue+headroom": AdmissionConfig(action="reject", estimate="queue", headroom=0.05),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/admission_overload.json")
    parser.add_argument("--policies", default="flowprefill,fcfs,edf")
    parser.add_argument("--rate", type=float, default=30.0, help="arrivals per second")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)

    cost = linear_cost_model()
    predictor = fit_predictor(cost)
    slo = SLOConfig(scale=args.slo_scale)
    rows = []
    for n in (args.requests, 2 * args.requests):
        requests = overload_requests(n, slo, rate_per_s=args.rate, seed=args.seed)
        for name in args.policies.split(","):
            for label, admission in SETTINGS.items():
                result, peak = simulate_admission(
                    requests, cost, predictor, slo, admission, policy=name
                )
                rows.append(
                    {
                        "policy": name,
                        "admission": label,
                        "requests": n,
                        "attainment": result.attainment,
                        "attainment_in_force": result.attainment_in_force,
                        "admitted_attainment": result.admitted_attainment,
                        "rejected": result.rejected,
                        "downgraded": result.downgraded,
                        "peak_waiting": peak,
                        "attainment_by_class": result.attainment_by_class(),
                        "makespan_s": result.makespan_s,
                    }
                )

    print(
        f"{'policy':<12}{'admission':<26}{'n':>6}{'attain':>8}{'in_force':>9}{'admitted':>9}"
        f"{'rejected':>9}{'downgr':>7}{'peak_wait':>10}"
    )
    for r in rows:
        print(
            f"{r['policy']:<12}{r['admission']:<26}{r['requests']:>6}{r['attainment']:>8.3f}"
            f"{r['attainment_in_force']:>9.3f}{r['admitted_attainment']:>9.3f}"
            f"{r['rejected']:>9}{r['downgraded']:>7}{r['peak_waiting']:>10}"
        )
    write_report(
        args.out,
        __file__,
        argv,
        "admission_overload",
        args=vars(args),
        settings={k: v.model_dump() for k, v in SETTINGS.items()},
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
