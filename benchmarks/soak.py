"""Soak: steady open-loop load for a long time, watching memory, errors and SLO attainment.

    .venv/bin/python benchmarks/soak.py --minutes 30 --load 0.7 --out results/soak.json

One local Ray cluster (loopback only) and one engine with the tiny model on CPU. The capacity
is measured first: the median TTFT of a lone request of ``--prompt-tokens`` is one prefill
worker's service time, so capacity = prefill workers / that time (requests per second; a
conservative figure, since batching raises it). Requests then arrive as a Poisson stream at
``--load`` x capacity for ``--minutes``; half are urgent (TTFT target ``--urgent-factor`` x
the service time) and half relaxed (``--relaxed-factor`` x). Admission control is on
(``policy.admission`` reject, ``max_in_flight``). Once every ``--sample-s`` seconds it records the
requests in the scheduler, decode KV blocks, prefill KV bytes and paused requests, and the
resident memory of the runtime's actor processes. ``--load 3`` is the overload run.
``--service-s`` fixes the service time instead (same rate and targets in two runs: A/B
comparisons, e.g. of an environment variable such as ``MALLOC_ARENA_MAX`` exported before the
run, which Ray passes on to the actors).

Prints a table (memory over time, counts, attainment) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from provenance import STARTED_AT, command_line, commit, machine

from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.7, help="offered load / measured capacity")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    p.add_argument("--urgent-factor", type=float, default=8.0)
    p.add_argument("--relaxed-factor", type=float, default=40.0)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--service-s",
        type=float,
        default=None,
        help="use this service time (s) instead of measuring it, so that two runs offer the "
        "same rate and targets (A/B comparisons)",
    )
    p.add_argument(
        "--admission",
        choices=["alone", "shipped"],
        default="alone",
        help="alone: reject what cannot make it alone; shipped: deployments/local.yaml's "
        "admission (queue estimate, headroom, bounded queue) and max_in_flight",
    )
    p.add_argument("--headroom", type=float, default=None, help="override admission.headroom")
    p.add_argument(
        "--no-unit-overhead",
        action="store_true",
        help="do not learn the per-unit overhead into the predictor (PolicyConfig)",
    )
    p.add_argument("--out", default="results/soak.json")
    return p.parse_args(argv)


def shipped_runtime() -> dict:
    """The runtime args of deployments/local.yaml."""
    import yaml

    path = Path(__file__).resolve().parent.parent / "deployments" / "local.yaml"
    return yaml.safe_load(path.read_text())["applications"][0]["args"]["runtime"]


def engine_config(args: argparse.Namespace, cache_dir: str) -> dict:
    config = _engine_config(args, cache_dir)
    if args.admission == "shipped":
        shipped = shipped_runtime()
        config["policy"]["admission"] = dict(shipped["policy"]["admission"])
        config["requests"]["max_in_flight"] = shipped["requests"]["max_in_flight"]
        config["prefill"]["profile_tokens"] = sorted({64, 256, 1024, args.prompt_tokens})
    if args.headroom is not None:
        config["policy"]["admission"]["headroom"] = args.headroom
    if args.no_unit_overhead:
        config["policy"]["learn_unit_overhead"] = False
    return config


def _engine_config(args: argparse.Namespace, cache_dir: str) -> dict:
    return {
        "model": {"path": "tiny", "cache_dir": cache_dir},
        "placement": {
            "num_prefill_workers": args.prefill_workers,
            "prefill_num_cpus": 0.5,
            "decode_num_cpus": 0.5,
        },
        "policy": {
            "name": "flowprefill",
            "admission": {"action": "reject", "estimate": "alone"},
        },
        "prefill": {"profile_tokens": [16, 64, 128, 256, 512], "profile_repeats": 1},
        "decode": {"kv_blocks": 1024, "block_size": 16, "max_batch_size": 64},
        "requests": {"max_in_flight": args.max_in_flight},
        "timeline": {"capacity": 20000},
        "name_prefix": "fp-soak",
    }


async def soak(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from steady_load import LoadClass, measure_prefill_s, run_steady_load

    from flowprefill_ray.runtime.engine import FlowPrefillEngine
    from flowprefill_ray.scheduling.why_late import summarize

    cache_dir = os.environ.get("FLOWPREFILL_CACHE") or tempfile.mkdtemp(prefix="fp-soak-")
    engine = await FlowPrefillEngine.start(engine_config(args, cache_dir))
    try:
        prefill_s = args.service_s or await measure_prefill_s(engine, args.prompt_tokens)
        capacity_rps = args.prefill_workers / prefill_s
        classes = [
            LoadClass("urgent", args.prompt_tokens, args.urgent_factor * prefill_s, 0.5),
            LoadClass("relaxed", args.prompt_tokens, args.relaxed_factor * prefill_s, 0.5),
        ]
        report = await run_steady_load(
            engine,
            classes,
            args.load * capacity_rps,
            args.minutes * 60.0,
            max_tokens=args.max_tokens,
            sample_period_s=args.sample_s,
            seed=args.seed,
        )
        timeline = await engine.timeline(None)
    finally:
        await engine.shutdown()
    return {
        "command": command_line(__file__, argv),
        "commit": commit(),
        "started_at": STARTED_AT,
        "machine": machine(),
        "args": vars(args),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_avg_at_end": os.getloadavg(),
        "engine_config": engine_config(args, cache_dir),
        "prefill_service_s": prefill_s,
        "capacity_rps": capacity_rps,
        **report.to_json(),
        "reject_s": sorted(o.reject_s for o in report.outcomes if o.reject_s is not None),
        # Why each admitted request that missed was late (the scheduler timeline's ring).
        "why_late": summarize(timeline),
    }


def print_table(result: dict) -> None:
    from flowprefill_ray.scheduling.why_late import format_summary

    print(
        f"service time {result['prefill_service_s'] * 1000:.1f} ms, capacity "
        f"{result['capacity_rps']:.2f} req/s, offered {result['rate_rps']:.2f} req/s "
        f"for {result['duration_s']:.0f} s"
    )
    print(f"{'t (s)':>8} {'in prefill':>10} {'decode blk':>10} {'prefill KV MiB':>14} "
          f"{'paused':>6} {'paused MiB':>10} {'actors RSS MiB':>14}  RSS MiB per actor kind")  # fmt: skip
    for s in result["samples"]:
        by_kind = " ".join(f"{k} {v:.1f}" for k, v in s.get("actors_rss_by_kind_mib", {}).items())
        print(
            f"{s['at_s']:8.1f} {s['scheduler_in_prefill']:10d} {s['decode_used_blocks']:10d} "
            f"{s['prefill_held_kv_bytes'] / 2**20:14.2f} {s['prefill_paused_requests']:6d} "
            f"{s['prefill_paused_bytes'] / 2**20:10.2f} "
            f"{s['actors_rss_mib']:14.1f}  {by_kind}"
        )
    print("counts:", result["counts"], "errors:", result["errors"] or "none")
    refusals = result["reject_s"]
    if refusals:
        p99 = refusals[min(len(refusals) - 1, int(0.99 * len(refusals)))]
        print(
            f"429 decided in: p50 {refusals[len(refusals) // 2] * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms"
        )
    print(format_summary(result["why_late"]))
    print(f"{'class':>8} {'sent':>6} {'rejected':>8} {'attainment':>10} {'p50 s':>7} {'p99 s':>7}")
    for name, c in result["per_class"].items():
        att = "-" if c["attainment"] is None else f"{c['attainment']:.3f}"
        p50 = "-" if c["ttft_p50_s"] is None else f"{c['ttft_p50_s']:.3f}"
        p99 = "-" if c["ttft_p99_s"] is None else f"{c['ttft_p99_s']:.3f}"
        print(f"{name:>8} {c['sent']:6d} {c['rejected']:8d} {att:>10} {p50:>7} {p99:>7}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=8)
    started = time.monotonic()
    try:
        result = asyncio.run(soak(args, argv))
    finally:
        ray.shutdown()
    result["wall_s"] = time.monotonic() - started
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
