"""Replay a slice of an Azure trace against the real Ray runtime, every policy side by side.

    .venv/bin/python benchmarks/runtime_replay.py --out results/runtime_replay.json

One local Ray cluster; one engine per policy (its own scheduler, prefill and decode workers),
all sharing one TTFT predictor profiled once on a prefill worker. For each load level the same
trace slice (same requests, same seed) is replayed open loop through ``FlowPrefillEngine`` for
each policy in turn. Everything runs on CPU with the tiny generated model, so the trace is
fitted to it (documented in docs/RUNTIME.md):

- prompt lengths are multiplied by ``--prompt-scale`` and capped at ``--max-prompt`` tokens;
  outputs are capped at ``--max-output`` tokens (decode is not what is measured here);
- the live speed is calibrated after start-up (slice prompts one at a time through the engine,
  measured TTFT / profiled prediction) and scales every fitted number below;
- SLO classes are assigned with the workloads package's length-banded rule (seed 0);
- the SLO scale is fitted to measured speed: the tightest class (text, 0.25 s at scale 1)
  gets ``--slo-factor`` x the predicted prefill time of the slice's median prompt;
- one block's compute is the profiled prefill time of the longest prompt divided by its
  checkpoints (2 per layer);
- the arrival rate is fitted so the offered prefill load (arrival rate x mean predicted prefill
  time) equals each ``--loads`` value (1.0 = one prefill worker busy all the time).

Reports per policy and load: TTFT SLO attainment (overall and per class), TTFT p50/p99, and
goodput (the highest tested request rate with >= 90 % attainment); the preemption blocking-time
distribution against one block's compute + 2 ms, during the flowprefill replays and isolated
(``--preemptions`` long prefills, each interrupted once with nothing else queued); the
scheduler's time per event; KV transfer time per MB. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from provenance import command_line

from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub

ATTAINMENT_TARGET = 0.9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trace", default="azure_2023_conv", help="built-in trace name")
    p.add_argument("--start-s", type=float, default=600.0, help="slice start in the trace, seconds")
    p.add_argument("--requests", type=int, default=120, help="requests in the slice")
    p.add_argument("--policies", default="flowprefill,fcfs,edf,chunked")
    p.add_argument("--chunk-size", type=int, default=128, help="chunked policy's chunk, tokens")
    p.add_argument("--loads", default="0.6,0.9", help="offered prefill loads, comma separated")
    p.add_argument("--prompt-scale", type=float, default=0.25)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=4)
    p.add_argument("--slo-factor", type=float, default=4.0)
    p.add_argument("--granularity", default="block", choices=["block", "layer", "operator"])
    p.add_argument("--preemptions", type=int, default=20, help="isolated blocking samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/runtime_replay.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ workload


def build_slice(args):
    """The trace slice with scaled lengths and assigned SLO classes (before rate fitting)."""
    from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin
    from flowprefill_ray.workloads.trace import TraceRecord, Workload

    trace = load_builtin(args.trace)
    window = trace.window(args.start_s, trace.duration_s + 1.0).head(args.requests)
    if len(window) < args.requests:
        raise SystemExit(
            f"trace {args.trace} has only {len(window)} requests after {args.start_s} s"
        )
    scaled = tuple(
        TraceRecord(
            r.arrival_s,
            max(4, min(args.max_prompt, round(r.prompt_tokens * args.prompt_scale))),
            max(1, min(args.max_output, r.output_tokens)),
        )
        for r in window
    )
    workload = Workload(f"{window.name} scaled x{args.prompt_scale:g}", scaled)
    return assign_slo_classes(workload, SLOAssignmentConfig(seed=args.seed))


def profile_predictor(config, path: Path):
    """Profile one prefill worker (the same actor code the engines use) and save the fit."""
    import ray

    from flowprefill_ray.runtime.prefill_worker import RemotePrefillWorker
    from flowprefill_ray.scheduling import PredictorConfig, TTFTPredictor

    worker = RemotePrefillWorker.options(num_cpus=0.5).remote(
        "profile", config.model, config.prefill, config.policy.long_chunk_tokens
    )
    points = ray.get(worker.profile.remote(list(config.prefill.profile_tokens), 3))
    ray.kill(worker)
    predictor = TTFTPredictor.fit(
        points, PredictorConfig(chunk_tokens=config.policy.long_chunk_tokens)
    )
    predictor.save(path)
    return predictor, points


# ------------------------------------------------------------------------------- replay


async def replay(engine, workload, rate_scale: float, seed: int, slo_targets: dict) -> list[dict]:
    """Submit every request at its (scaled) arrival time; collect per-request outcomes."""
    from flowprefill_ray.errors import RequestRejectedError
    from flowprefill_ray.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(r.prompt_tokens)] for r in workload]
    t0 = workload.records[0].arrival_s
    started = time.monotonic()

    async def one(i: int, record) -> dict:
        await asyncio.sleep(
            max(0.0, (record.arrival_s - t0) / rate_scale - (time.monotonic() - started))
        )
        sampling = SamplingParams(temperature=0.0, max_tokens=record.output_tokens, ignore_eos=True)
        outcome = {"class": record.slo_class, "prompt_tokens": record.prompt_tokens}
        try:
            slo = slo_targets[record.slo_class]  # explicit seconds: the fitted SLO scale
            outputs = [o async for o in engine.submit(prompts[i], sampling, slo)]
        except RequestRejectedError:
            return {**outcome, "rejected": True, "met": False}
        first = outputs[0]
        return {
            **outcome,
            "rejected": False,
            "ttft_s": first.ttft_s,
            "queue_s": first.queue_s,
            "slo_s": first.ttft_slo_s,
            "met": first.ttft_s <= first.ttft_slo_s,
            "preemptions": first.preemptions,
            "finish": outputs[-1].finish_reason,
        }

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(workload)))
    return results, time.monotonic() - started


async def calibrate(engine, workload, predictor, samples: int = 16) -> float:
    """Live speed against the profile: prompts of the slice's lengths (spread over its length
    range) run one at a time through the engine; sum of TTFTs / sum of predictions."""
    from flowprefill_ray.sampling_params import SamplingParams

    lengths = sorted(r.prompt_tokens for r in workload)
    picked = [lengths[i * (len(lengths) - 1) // (samples - 1)] for i in range(samples)]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    measured = 0.0
    for n in picked:
        outputs = await engine.generate([3 + (7 * j) % 400 for j in range(n)], one, 600.0)
        measured += outputs[0].ttft_s
    return measured / sum(predictor.predict(n) for n in picked)


async def isolated_blocking(
    engine, long_tokens: int, count: int, urgent_slo_s: float
) -> list[tuple[float, float]]:
    """Preemption blocking with nothing else queued: ``count`` times, a long relaxed prefill
    is interrupted at a random moment by an urgent short request whose SLO it would miss by
    waiting (the policy only preempts when that buys something). Seconds per preemption."""
    from flowprefill_ray.sampling_params import SamplingParams

    rng = random.Random(1)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    before = len((await engine.stats())["scheduler"]["preemption_blocking_s"])
    for i in range(count):
        long_prompt = [rng.randrange(3, 400) for _ in range(long_tokens)]
        long = asyncio.ensure_future(engine.generate(long_prompt, one, 600.0, f"iso-long-{i}"))
        while not long.done() and not any(
            (await engine.stats())["scheduler"]["running_units"].values()
        ):
            await asyncio.sleep(0.002)
        if long.done():  # finished (or failed) before the poll saw it run: no sample
            await long
            continue
        await asyncio.sleep(rng.uniform(0.0, 0.1))
        urgent = [rng.randrange(3, 400) for _ in range(16)]
        await engine.generate(urgent, one, urgent_slo_s, f"iso-urgent-{i}")
        await long
    return _pairs((await engine.stats())["scheduler"])[before:]


def _pairs(scheduler_stats: dict) -> list[tuple[float, float]]:
    """(blocking, block in flight) seconds per preemption, both measured in the worker."""
    return list(
        zip(
            scheduler_stats["preemption_blocking_s"],
            scheduler_stats["preemption_block_in_flight_s"],
            strict=True,
        )
    )


def _against(pairs: list[tuple[float, float]], target_s: float) -> dict:
    """Blocking times against the fixed target (one block at live speed + 2 ms), and against
    the block each preemption actually waited for (+ 2 ms): did it stop at the next
    checkpoint, whatever the machine's load did to that block?"""
    blocking = [b for b, _ in pairs]
    ok = bool(blocking) and _quantile(blocking, 0.99) <= target_s
    at_next = sum(1 for b, block in pairs if b <= block + 0.002)
    return {
        **_dist(blocking),
        "p99_within_target": ok,
        "block_in_flight_s": _dist([block for _, block in pairs]),
        "stopped_within_block_in_flight_plus_2ms": at_next / len(pairs) if pairs else None,
    }


def summarize(results: list[dict], rate: float, elapsed_s: float) -> dict:
    served = [r for r in results if not r["rejected"]]
    ttfts = sorted(r["ttft_s"] for r in served)
    by_class = {}
    for cls in sorted({r["class"] for r in results}):
        mine = [r for r in results if r["class"] == cls]
        by_class[cls] = sum(r["met"] for r in mine) / len(mine)
    return {
        "rate_req_s": rate,
        "attainment": sum(r["met"] for r in results) / len(results),
        "attainment_by_class": by_class,
        "ttft_p50_s": _quantile(ttfts, 0.5),
        "ttft_p99_s": _quantile(ttfts, 0.99),
        "rejected": sum(r["rejected"] for r in results),
        "preemptions": sum(r.get("preemptions", 0) for r in served),
        "completed": sum(1 for r in served if r["finish"] == "length"),
        "elapsed_s": elapsed_s,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _dist(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": _quantile(values, 0.5),
        "p90": _quantile(values, 0.9),
        "p99": _quantile(values, 0.99),
        "max": max(values),
    }


# --------------------------------------------------------------------------------- main


async def run(args) -> dict:
    from flowprefill_ray.runtime import FlowPrefillEngine, RuntimeConfig
    from flowprefill_ray.scheduling import POLICIES, SLOConfig

    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"policies {unknown} are not available; available: {sorted(POLICIES)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def config(policy: str, predictor_path: str | None = None):
        return RuntimeConfig.model_validate(
            {
                "model": {"path": "tiny"},
                "placement": {"prefill_num_cpus": 0.5, "decode_num_cpus": 0.5},
                "policy": {"name": policy, "chunk_size": args.chunk_size},
                "prefill": {
                    "granularity": args.granularity,
                    "profile_tokens": [16, 64, 128, 256, 512, 1024, args.max_prompt],
                },
                "decode": {"kv_blocks": 2048, "max_batch_size": 64},
                "requests": {"max_output_tokens": args.max_output},
                "predictor_path": predictor_path,
                "name_prefix": f"replay-{policy}",
            }
        )

    workload = build_slice(args)
    predictor_path = out.with_suffix(".predictor.json")
    predictor, profile = profile_predictor(config("fcfs"), predictor_path)
    prompt_lengths = sorted(r.prompt_tokens for r in workload)
    median_prompt = prompt_lengths[len(prompt_lengths) // 2]
    trace_rate = (len(workload) - 1) / (
        workload.records[-1].arrival_s - workload.records[0].arrival_s
    )

    engines = {}
    for policy in policies:
        engines[policy] = await FlowPrefillEngine.start(config(policy, str(predictor_path)))
    layers = next(iter(engines.values())).model_config.num_hidden_layers
    # The start-up profile ran under whatever else loads this machine at that moment; the
    # live speed (isolated requests through the real engine) rescales every fitted number.
    slowdown = await calibrate(engines[policies[0]], workload, predictor)
    slo_scale = args.slo_factor * slowdown * predictor.predict(median_prompt) / 0.25
    slo = SLOConfig(scale=slo_scale)
    slo_targets = {name: slo.resolve(name).ttft_slo_s for name in slo.class_names}
    mean_prefill_s = slowdown * statistics.fmean(predictor.predict(n) for n in prompt_lengths)
    # One attention or MLP block of the longest prompt at live speed: the most a preemption
    # should wait for (block granularity has 2 checkpoints per layer).
    block_s = slowdown * predictor.predict(max(prompt_lengths)) / (2 * layers)
    runs = []
    replay_blocking: list[tuple[float, float]] = []
    isolated: list[tuple[float, float]] = []
    try:
        for load in [float(x) for x in args.loads.split(",")]:
            rate = load / mean_prefill_s
            for policy in policies:
                results, elapsed = await replay(
                    engines[policy], workload, rate / trace_rate, args.seed, slo_targets
                )
                summary = summarize(results, rate, elapsed)
                runs.append({"policy": policy, "load": load, **summary})
                print(
                    f"  {policy:12s} load {load:.2f}: attainment {summary['attainment']:.1%}",
                    flush=True,
                )
        if "flowprefill" in engines:
            stats = (await engines["flowprefill"].stats())["scheduler"]
            replay_blocking = _pairs(stats)
            # Waiting for the long prefill would miss this SLO; being preempted for keeps it.
            long_s = slowdown * predictor.predict(max(prompt_lengths))
            isolated = await isolated_blocking(
                engines["flowprefill"], max(prompt_lengths), args.preemptions, 0.3 * long_s
            )
        stats = {policy: await engine.stats() for policy, engine in engines.items()}
    finally:
        for engine in engines.values():
            await engine.shutdown()

    goodput = {}
    for policy in policies:
        ok = [
            r["rate_req_s"]
            for r in runs
            if r["policy"] == policy and r["attainment"] >= ATTAINMENT_TARGET
        ]
        goodput[policy] = max(ok) if ok else 0.0
    overhead = {}
    for policy, s in stats.items():
        overhead[policy] = {
            event: {
                "total": _dist(v),
                "policy_only": _dist(s["scheduler"]["policy_decision_s"][event]),
            }
            for event, v in s["scheduler"]["event_overhead_s"].items()
        }
    transfers = [
        t
        for s in stats.values()
        for d in s["decode_workers"].values()
        for t in d["kv_transfer_samples"]
    ]
    mb = sum(b for b, _ in transfers) / 1e6
    return {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "args": vars(args),
        "workload": {
            "name": workload.name,
            "requests": len(workload),
            "classes": workload.slo_classes,
            "prompt_tokens_p50": median_prompt,
            "prompt_tokens_max": max(prompt_lengths),
            "trace_rate_req_s": trace_rate,
        },
        "fit": {
            "slowdown_vs_profile": slowdown,
            "slo_scale": slo_scale,
            "slo_targets_s": slo_targets,
            "text_slo_s": 0.25 * slo_scale,
            "mean_prefill_s": mean_prefill_s,
            "profile": profile,
            "block_compute_s": block_s,
            "layers": layers,
        },
        "runs": runs,
        "goodput_req_s": goodput,
        "preemption_blocking_s": {
            "target_s": block_s + 0.002,
            "replay": _against(replay_blocking, block_s + 0.002),
            "isolated": _against(isolated, block_s + 0.002),
        },
        "scheduler_overhead_s": overhead,
        "kv_transfer": {
            "requests": len(transfers),
            "megabytes": mb,
            "seconds_per_mb": (sum(s for _, s in transfers) / mb) if mb else None,
            "per_request_s": _dist([s for _, s in transfers]),
        },
    }


def print_report(report: dict) -> None:
    fit = report["fit"]
    print(
        f"\nworkload: {report['workload']['name']}, {report['workload']['requests']} requests, "
        f"live speed {fit['slowdown_vs_profile']:.2f} x profile, SLO scale {fit['slo_scale']:.3f} "
        f"(text {fit['text_slo_s'] * 1000:.0f} ms)"
    )
    print(
        f"{'policy':12s} {'load':>5s} {'rate/s':>7s} {'attain':>7s} {'text':>6s} {'image':>6s} "
        f"{'search':>6s} {'file':>6s} {'ttft p50':>9s} {'ttft p99':>9s} {'preempt':>7s}"
    )
    for r in report["runs"]:
        c = r["attainment_by_class"]
        print(
            f"{r['policy']:12s} {r['load']:5.2f} {r['rate_req_s']:7.1f} {r['attainment']:7.1%} "
            + " ".join(
                f"{c.get(k, float('nan')):6.0%}" for k in ("text", "image", "search", "file")
            )
            + f" {r['ttft_p50_s'] * 1000:7.1f}ms {r['ttft_p99_s'] * 1000:7.1f}ms {r['preemptions']:7d}"
        )
    print(
        "goodput (highest tested rate with >= 90 % attainment, req/s):",
        ", ".join(f"{p} {g:.1f}" for p, g in report["goodput_req_s"].items()),
    )
    blocking = report["preemption_blocking_s"]
    for kind in ("replay", "isolated"):
        b = blocking[kind]
        if b["n"]:
            print(
                f"preemption blocking, {kind} (flowprefill, n={b['n']}): mean "
                f"{b['mean'] * 1000:.2f} ms, p50 {b['p50'] * 1000:.2f} ms, p99 "
                f"{b['p99'] * 1000:.2f} ms, max {b['max'] * 1000:.2f} ms; target p99 <= "
                f"{blocking['target_s'] * 1000:.2f} ms: "
                f"{'met' if b['p99_within_target'] else 'MISSED'}; stopped within the block in "
                f"flight + 2 ms: {b['stopped_within_block_in_flight_plus_2ms']:.0%} "
                f"(that block: p50 {b['block_in_flight_s']['p50'] * 1000:.2f} ms, "
                f"p99 {b['block_in_flight_s']['p99'] * 1000:.2f} ms)"
            )
    print("scheduler time per event, p50 / p99 in us (policy.on_event + dispatch; policy alone):")
    for policy, events in report["scheduler_overhead_s"].items():
        cells = ", ".join(
            f"{e} {d['total']['p50'] * 1e6:.0f}/{d['total']['p99'] * 1e6:.0f} "
            f"({d['policy_only']['p50'] * 1e6:.0f}/{d['policy_only']['p99'] * 1e6:.0f})"
            for e, d in sorted(events.items())
            if d["total"]["n"] and e != "WorkerJoined"
        )
        print(f"  {policy:12s} {cells}")
    kv = report["kv_transfer"]
    if kv["megabytes"]:
        print(
            f"KV transfer: {kv['requests']} hand-offs, {kv['megabytes']:.1f} MB, "
            f"{kv['seconds_per_mb'] * 1000:.2f} ms/MB, per request p50 "
            f"{kv['per_request_s']['p50'] * 1000:.2f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=8)
    try:
        report = {"command": command_line(__file__, argv), **asyncio.run(run(args))}
    finally:
        ray.shutdown()
    print_report(report)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
