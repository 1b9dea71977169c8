"""Scheduling policies side by side on the live system (Ray + Serve + HTTP), same trace, same seed.

For each policy the Serve app is redeployed from scratch (fresh engine, scheduler, predictor),
then the same trace slice is replayed open loop through the OpenAI-compatible API:

- ``--mode search`` (default): a goodput search per policy (bisection on the rate scale for
  >= 90 % TTFT attainment, ``loadgen.goodput``); every trial is an attainment-vs-rate point;
- ``--mode sweep``: the same fixed rate scales for every policy; goodput is the highest scale
  in the sweep that held 90 %.

With ``--simulate`` each live trial is also run through the discrete-event simulator (same
requests, arrivals, lengths and SLO targets; the committed CPU profile of the model served:
``simulator/profiles/tiny_cpu.json`` with ``--tiny``, ``smollm2_cpu.json`` otherwise), to show
how well the simulator predicts the runtime. Both profiles were measured on one thread of the
development machine; elsewhere, measure one (``python scripts/profile_model.py``) and pass it
with ``--profile``.

Prints a table and ratios (flowprefill / each baseline) and writes JSON (``--out``) plus plots
next to it. Run:  python benchmarks/live_policies.py --tiny --out results/live_policies.json
(also ``python -m flowprefill_ray bench ...``). Results and commands: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# provenance.py and sim_compare.py lie beside this script: its folder is on sys.path when the
# script runs, but not under `python -m flowprefill_ray bench` (runpy) or when a test loads
# this file by path, so put it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub

# The default comparison: the paper's baselines. Any policy of the package can be named.
POLICIES = ("flowprefill", "fcfs", "chunked", "edf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from loadgen.replay_args import CPU_SLICE_DEFAULTS, add_replay_arguments

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="docs/ENVIRONMENT's tiny generated model, the one the simulator's CPU profile "
        "prices (else SmolLM2)",
    )
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--chunk-size", type=int, default=64, help="chunked policy's chunk (tokens)")
    p.add_argument("--mode", choices=["search", "sweep"], default="search")
    p.add_argument("--scales", default="0.5,1,2", help="sweep: rate scales, comma separated")
    p.add_argument("--first-scale", type=float, default=1.0, help="search: first rate scale")
    p.add_argument("--max-trials", type=int, default=5, help="search: replays per policy")
    p.add_argument("--rel-tol", type=float, default=0.25, help="search: relative bracket width")
    # The demo's CPU-sized slice; the rate scale is no flag: the search or --scales set it.
    add_replay_arguments(p, omit=("rate_scale",), **CPU_SLICE_DEFAULTS, max_requests=40)
    p.add_argument("--slo-scale", type=float, default=4.0)
    p.add_argument(
        "--simulate", action="store_true", help="also predict each trial with the simulator"
    )
    p.add_argument(
        "--resimulate",
        action="store_true",
        help="no live runs: redo the simulator comparison for the trials already in --out",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="simulator profile JSON for --simulate/--resimulate (default: the committed "
        "profile of the model served)",
    )
    p.add_argument("--out", default="results/live_policies.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def tiny_model_path() -> str:
    """docs/ENVIRONMENT's tiny Llama (hidden 256), generated once into the runtime's model
    cache. Not the runtime's own ``tiny`` (hidden 128, for tests): this is the model
    ``simulator/profiles/tiny_cpu.json`` was measured on, so ``--simulate`` prices the very
    model the live system serves, and its prefills are long enough on CPU to load the worker
    before the HTTP stack saturates the two cores."""
    from flowprefill_ray.model.checkpoints import ENVIRONMENT_TINY_SHAPE, cached_tiny_checkpoint
    from flowprefill_ray.runtime.config import ModelSource
    from flowprefill_ray.runtime.model_source import cache_dir

    path = cache_dir(ModelSource()) / "tiny-llama-environment"
    return str(cached_tiny_checkpoint(path, **ENVIRONMENT_TINY_SHAPE))


def policy_config(name: str, chunk_size: int) -> dict[str, Any]:
    return {"name": name, "chunk_size": chunk_size} if name == "chunked" else {"name": name}


def simulator_cost_model(model: str, profile: str | None) -> Any:
    """The simulator's cost model for a live run that served ``model`` (``"default"`` or the
    tiny model's path): ``profile`` if given, else the committed profile of that model."""
    from flowprefill_ray.simulator.measured import MeasuredCostModel, MeasuredProfile, profile_path

    path = profile or profile_path("default" if model == "default" else "tiny")
    return MeasuredCostModel(MeasuredProfile.load(path))


def add_simulation(
    results: dict[str, Any],
    replay: Any,
    slo: Any,
    chunk_size: int,
    trials_dir: Path,
    cost_model: Any,
) -> dict[str, Any]:
    """Predict every live trial with the simulator, twice: with ``cost_model`` (the served
    model's profile) as is (``simulated_*``), and calibrated to the live system (``calibrated_*``):
    its compute speed and per-unit and per-response overheads, fitted to the lowest-rate trial
    of each policy (``sim_compare.calibrate``). Returns the calibration and the mean
    absolute gap between live and predicted attainment, in points."""
    from sim_compare import calibrate, simulate_trials, simulated_goodput

    calibration_requests = []
    for policy, r in results.items():
        if r and r["points"]:
            low = min(r["points"], key=lambda p: p["rate_scale"])
            path = trials_dir / policy / f"x{low['rate_scale']:.4g}" / "results.json"
            calibration_requests += json.loads(path.read_text())["requests"]
    calibration = calibrate(calibration_requests, cost_model)
    gaps: dict[str, list[float]] = {"simulated": [], "calibrated": []}
    goodput: dict[str, dict[str, float]] = {}
    for policy, r in results.items():
        if not r:
            continue
        config = policy_config(policy, chunk_size)
        goodput[policy] = {
            "simulated": simulated_goodput(replay, slo, config, cost_model=cost_model),
            "calibrated": simulated_goodput(
                replay, slo, config, calibration, cost_model=cost_model
            ),
        }
        simulate_trials(r["points"], replay, slo, config, cost_model, prefix="simulated")
        simulate_trials(
            r["points"],
            replay,
            slo,
            config,
            cost_model,
            prefix="calibrated",
            calibration=calibration,
        )
        for p in r["points"]:
            for prefix, values in gaps.items():
                values.append(abs(p["attainment"] - p[f"{prefix}_attainment"]) * 100)
    return {
        "cost_model": cost_model.name,
        "calibration": {
            "speed": calibration.speed,
            "unit_overhead_s": calibration.unit_overhead_s,
            "response_overhead_s": calibration.response_overhead_s,
            "requests": calibration.requests,
        },
        "calibration_text": calibration.describe(),
        # The simulator's own goodput (rate scale) per policy: as profiled and calibrated.
        "goodput_rate_scale": goodput,
        "mean_abs_gap_points": {k: sum(v) / len(v) if v else None for k, v in gaps.items()},
        "max_abs_gap_points": {k: max(v) if v else None for k, v in gaps.items()},
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from provenance import command_line

    from flowprefill_ray.demos.local_serve import LocalServe, serve_app_args, served_model_name
    from flowprefill_ray.scheduling.slo import SLOConfig
    from flowprefill_ray.simulator.goodput import GoodputSearchConfig
    from loadgen import EndpointConfig, ReplayConfig
    from loadgen.goodput import live_goodput_search, run_trial
    from loadgen.plots import plot_attainment_vs_rate
    from loadgen.replay_args import replay_config

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from flowprefill_ray.scheduling import POLICIES as AVAILABLE

    unknown = sorted(set(policies) - set(AVAILABLE))
    if unknown:
        print(f"error: unknown policies {unknown}; known: {sorted(AVAILABLE)}", file=sys.stderr)
        return 2
    model = tiny_model_path() if args.tiny else "default"
    slo = SLOConfig(scale=args.slo_scale)
    replay = replay_config(args)
    out = Path(args.out)
    trials_dir = out.with_suffix("")
    if args.resimulate:
        document = json.loads(out.read_text())
        document["simulation"] = add_simulation(
            document["policies"],
            ReplayConfig(**document["replay"]),
            SLOConfig(**document["slo"]),
            args.chunk_size,
            trials_dir,
            simulator_cost_model(document["model"], args.profile),
        )
        out.write_text(json.dumps(document, indent=1))
        print(format_table(document["policies"], document["ratios"], document["simulation"]))
        return 0
    deploys = {
        p: serve_app_args(
            model,
            policy_config(p, args.chunk_size),
            args.slo_scale,
            profile_max_tokens=args.max_prompt_tokens,
        )
        for p in policies
    }
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with LocalServe(deploys[policies[0]]) as live:
        for i, policy in enumerate(policies):
            if i:
                live.redeploy(deploys[policy])
            endpoint = EndpointConfig(base_url=live.url, model=served_model_name(deploys[policy]))
            print(
                f"[bench] {policy}: deployed at {time.perf_counter() - started:.0f} s", flush=True
            )
            if args.mode == "search":
                search = GoodputSearchConfig(
                    start=args.first_scale,
                    rel_tol=args.rel_tol,
                    max_evaluations=args.max_trials,
                    min_scale=min(0.05, args.first_scale),
                    max_scale=64,
                )
                try:
                    report = live_goodput_search(
                        endpoint,
                        replay,
                        slo,
                        trials_dir / policy,
                        search=search,
                        progress=not args.no_progress,
                    )
                except RuntimeError as exc:  # the search ran out of trials before bracketing
                    print(f"[bench] {policy}: {exc}", file=sys.stderr)
                    report = None
                results[policy] = report
            else:
                points = []
                for scale in [float(s) for s in args.scales.split(",")]:
                    trial = run_trial(
                        endpoint, replay, slo, scale, trials_dir / policy, not args.no_progress
                    )
                    points.append(
                        {
                            "rate_scale": scale,
                            "rate_rps": trial.rate_rps,
                            "attainment": trial.attainment,
                            "attainment_by_class": {
                                c: s["attainment"] for c, s in trial.summary["per_class"].items()
                            },
                            "ttft_p99_s": trial.summary["overall"]["ttft_s"]["p99"],
                        }
                    )
                    time.sleep(2.0)
                passing = [p for p in points if p["attainment"] >= 0.9]
                best = max(passing, key=lambda p: p["rate_scale"]) if passing else None
                results[policy] = {
                    "goodput_rate_scale": best["rate_scale"] if best else 0.0,
                    "goodput_rps": best["rate_rps"] if best else 0.0,
                    "points": points,
                }

    simulation = (
        add_simulation(
            results,
            replay,
            slo,
            args.chunk_size,
            trials_dir,
            simulator_cost_model(model, args.profile),
        )
        if args.simulate
        else None
    )

    document = {
        "command": command_line(__file__, argv),
        "model": model,
        "replay": replay.model_dump(),
        "slo": slo.model_dump(),
        "policies": results,
        "wall_s": time.perf_counter() - started,
    }
    if simulation is not None:
        document["simulation"] = simulation
    base = (results.get("flowprefill") or {}).get("goodput_rps", 0.0)
    document["ratios"] = {
        f"flowprefill/{p}": _ratio(base, (results.get(p) or {}).get("goodput_rps", 0.0))
        for p in policies
        if p != "flowprefill"
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    series = {
        p: [(pt["rate_rps"], pt["attainment"]) for pt in r["points"]]
        for p, r in results.items()
        if r
    }
    plot = plot_attainment_vs_rate(
        series,
        trials_dir / "attainment_vs_rate.png",
        title=f"live {'tiny' if args.tiny else 'SmolLM2'}, {args.trace}: TTFT SLO attainment",
    )
    print(format_table(results, document["ratios"], simulation))
    print(f"wrote {out} and {plot}")
    return 0


def format_table(
    results: dict[str, Any],
    ratios: dict[str, float | None],
    simulation: dict[str, Any] | None = None,
) -> str:
    """Goodput per policy, then each trial's live attainment (and the simulator's, if run)."""

    def trial(p: dict[str, Any]) -> str:
        text = f"x{p['rate_scale']:.3g}: {p['attainment'] * 100:.0f}"
        if "simulated_attainment" in p:
            text += f" (sim {p['simulated_attainment'] * 100:.0f}"
            text += (
                f", cal {p['calibrated_attainment'] * 100:.0f})"
                if "calibrated_attainment" in p
                else ")"
            )
        return text

    lines = [f"{'policy':<12} {'goodput x':>9} {'req/s':>7}  attainment % by rate scale"]
    for policy, r in results.items():
        if not r:
            lines.append(f"{policy:<12} {'-':>9} {'-':>7}  search did not bracket")
            continue
        trials = ", ".join(trial(p) for p in r["points"])
        lines.append(
            f"{policy:<12} {r['goodput_rate_scale']:>9.3g} {r['goodput_rps']:>7.2f}  {trials}"
        )
    for name, value in ratios.items():
        lines.append(f"{name}: {'n/a (baseline goodput 0)' if value is None else f'{value:.2f}x'}")
    if simulation:
        gap = simulation["mean_abs_gap_points"]
        lines.append(
            f"simulator ({simulation['cost_model']}) vs live, mean |attainment gap|: "
            f"{gap['simulated']:.1f} points as profiled, {gap['calibrated']:.1f} points calibrated "
            f"({simulation['calibration_text']})"
        )
        for policy, g in simulation.get("goodput_rate_scale", {}).items():
            lines.append(
                f"simulated goodput {policy}: x{g['simulated']:.3g} as profiled, "
                f"x{g['calibrated']:.3g} calibrated"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
