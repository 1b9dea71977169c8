"""Two tenants on the shipped local deployment: who missed, and why (issue 21, section 2).

    .venv/bin/python benchmarks/why_late_replay.py --label before --out docs/results/why_late.json

Deploys the Serve app with exactly the args of ``deployments/local.yaml`` (SmolLM2 on CPU, the
shipped policy and admission), except the SLO classes: two tenants with their own TTFT
promises, ``urgent`` (the Azure 2023 conversation trace, 6 s) and ``relaxed`` (the Azure 2023
code trace, 23.2 s). Both traces are replayed at once, interleaved by arrival, prompts scaled
to the model (``--prompt-scale``), through the OpenAI-compatible HTTP API, open loop, for
``--duration`` seconds at ``--rate-scale`` of the traces' own rate.

Steady state, not a drained burst: requests sent in the first ``--warmup`` seconds are left
out of the attainment; the run is marked ``stable: false`` when requests were still waiting
for their first token more than twice the loosest SLO after the last send.

Then it fetches the scheduler's timeline (``GET /v1/flowprefill/timeline``) and attributes
every miss to one cause (``flowprefill_ray.scheduling.why_late``). The JSON (``--out``) keeps
each run under ``runs[--label]`` with its own command, commit and machine, so a "before" and
an "after" run of two commits sit side by side in one file; the full timeline and its Gantt
chart go to ``--run-dir`` (default ``results/why_late_<label>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub

from cli_json import json_object  # noqa: E402
from provenance import command_line, commit, machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="the run's name in the JSON (before, after)")
    p.add_argument("--out", default="results/why_late.json")
    p.add_argument("--run-dir", default=None, help="timeline.json and timeline.png go here")
    p.add_argument("--trace", default="azure-conv=urgent,azure-code=relaxed")
    p.add_argument("--urgent-slo", type=float, default=6.0, help="urgent TTFT target, s")
    p.add_argument("--relaxed-slo", type=float, default=23.2, help="relaxed TTFT target, s")
    p.add_argument("--rate-scale", type=float, default=0.25)
    p.add_argument("--prompt-scale", type=float, default=0.1)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output-tokens", type=int, default=16)
    p.add_argument("--start", type=float, default=0.0, help="seconds of the traces to skip")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of sending")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds left out of attainment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policy-json",
        default="{}",
        help="fields merged into the shipped policy config (an ablation), e.g. "
        "'{\"late_resume\": false}'",
    )
    args = p.parse_args(argv)
    try:
        args.policy = json_object(args.policy_json, "--policy-json")
    except ValueError as error:
        p.error(str(error))
    return args


def shipped_args() -> dict[str, Any]:
    """The Serve app args of deployments/local.yaml."""
    import yaml

    text = (REPO / "deployments" / "local.yaml").read_text()
    return yaml.safe_load(text)["applications"][0]["args"]


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped args with the two tenants' SLO classes and any policy override."""
    from flowprefill_ray.serve.config import ServeAppArgs

    deploy = shipped_args()
    runtime = deploy["runtime"]
    runtime["slo"] = {
        "classes": [
            {"name": "urgent", "ttft_slo_s": args.urgent_slo, "tpot_slo_s": 0.5},
            {"name": "relaxed", "ttft_slo_s": args.relaxed_slo, "tpot_slo_s": 0.5},
        ],
        "default_class": "urgent",
    }
    runtime["policy"] = {**runtime["policy"], **args.policy}
    # Every request of the run must stay in the ring, whatever the shipped capacity.
    runtime["timeline"] = {"capacity": 20_000}
    return ServeAppArgs.model_validate(deploy).model_dump(mode="json")


def sent_and_steady(records: list, warmup_s: float) -> tuple[list, list]:
    """The records of requests that were sent, and of those sent after the warm-up."""
    sent = [r for r in records if r.sent_s is not None]
    return sent, [r for r in sent if r.sent_s >= warmup_s]


def steady_summary(records: list, warmup_s: float, loosest_slo_s: float) -> dict[str, Any]:
    """Attainment per class over requests sent after the warm-up, and whether the backlog
    drained: no request still without a first token ``2 x loosest_slo_s`` after the last
    send (unfinished requests count as misses either way)."""
    sent, steady = sent_and_steady(records, warmup_s)
    last_send = max(r.sent_s for r in sent)
    per_class: dict[str, dict[str, Any]] = {}
    for name in sorted({r.slo_class for r in steady}):
        group = [r for r in steady if r.slo_class == name]
        ttfts = sorted(r.ttft_s for r in group if r.ttft_s is not None)
        per_class[name] = {
            "requests": len(group),
            "met": sum(r.slo_met for r in group),
            "attainment": sum(r.slo_met for r in group) / len(group),
            "rejected": sum(1 for r in group if r.http_status == 429),
            "failed": sum(1 for r in group if r.status in ("error", "http_error"))
            - sum(1 for r in group if r.http_status == 429),
            "unfinished": sum(1 for r in group if r.status == "unfinished"),
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else None,
        }
    late_first = [
        r
        for r in sent
        if r.first_token_s is None or r.first_token_s > last_send + 2 * loosest_slo_s
    ]
    stuck = [r for r in late_first if r.http_status != 429 and r.status != "error"]
    return {
        "steady_requests": len(steady),
        "attainment": sum(r.slo_met for r in steady) / len(steady) if steady else None,
        "per_class": per_class,
        "last_send_s": last_send,
        "stable": not stuck,
        "not_drained": len(stuck),
    }


def urgent_feasible_misses(verdicts: list[dict[str, Any]], urgent: str = "urgent") -> dict:
    """Misses of the urgent tenant that were feasible at arrival, counted per cause: the
    issue's bar is zero for ``batch_overran`` and ``paused_after_late``."""
    counts: dict[str, int] = {}
    for v in verdicts:
        if v["slo_class"] == urgent and v["cause"] != "infeasible_at_arrival":
            counts[v["cause"]] = counts.get(v["cause"], 0) + 1
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flowprefill_ray.demos.local_serve import LocalServe
    from flowprefill_ray.scheduling.slo import SLOConfig
    from flowprefill_ray.scheduling.why_late import summarize, why_late
    from flowprefill_ray.serve.config import ServeAppArgs
    from flowprefill_ray.timeline_plot import draw_gantt
    from loadgen import EndpointConfig
    from loadgen.config import ReplayConfig
    from loadgen.plan import load_trace_workload, plan_requests, ttft_targets
    from loadgen.runner import run_open_loop
    from loadgen.server_timeline import fetch_timeline

    deploy = app_args(args)
    slo = SLOConfig.model_validate(deploy["runtime"]["slo"])
    loosest = max(c.ttft_slo_s for c in slo.classes)
    replay = ReplayConfig(
        trace=args.trace,
        start_s=args.start,
        rate_scale=args.rate_scale,
        prompt_scale=args.prompt_scale,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        max_requests=100_000,
        duration_s=args.duration,
        drain_s=2 * loosest + 30.0,
        seed=args.seed,
    )
    plan = plan_requests(load_trace_workload(args.trace), replay, ttft_targets(slo))
    plan = [p for p in plan if p.send_at_s < args.duration]
    run_dir = Path(args.run_dir or f"results/why_late_{args.label}")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[why-late] {len(plan)} requests over {args.duration:g} s; deploying", flush=True)
    with LocalServe(deploy) as live:
        model = ServeAppArgs.model_validate(deploy).served_model_name()
        endpoint = EndpointConfig(base_url=live.url, model=model)
        started = time.perf_counter()
        result = asyncio.run(run_open_loop(endpoint, replay, plan, progress=False))
        wall_s = time.perf_counter() - started
        timeline = fetch_timeline(endpoint, len(plan) + 100)
    if timeline is None:
        raise RuntimeError("the server returned no timeline")
    (run_dir / "timeline.json").write_text(json.dumps(timeline))
    verdicts = why_late(timeline)
    draw_gantt(timeline, run_dir / "timeline.png", verdicts)
    steady = steady_summary(result.records, args.warmup, loosest)
    prompt = [p.prompt_tokens for p in plan]
    return {
        "label": args.label,
        "command": command_line(__file__, sys.argv[1:]),
        "commit": commit(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall_s)),
        "machine": machine(),
        "policy": deploy["runtime"]["policy"],
        "slo_classes": deploy["runtime"]["slo"]["classes"],
        "offered": {
            "requests": len(plan),
            "rate_rps": (len(plan) - 1) / max(1e-9, plan[-1].send_at_s) if len(plan) > 1 else None,
            "prompt_tokens_mean": sum(prompt) / len(prompt),
            "per_class": {
                c: sum(1 for p in plan if p.slo_class == c)
                for c in sorted({p.slo_class for p in plan})
            },
        },
        "wall_s": wall_s,
        **steady,
        "why_late": summarize(timeline, verdicts),
        "urgent_feasible_misses": urgent_feasible_misses(verdicts),
        "misses": verdicts,
    }


def print_run(r: dict[str, Any]) -> None:
    print(
        f"\n{r['label']}: {r['offered']['requests']} requests, {r['offered']['rate_rps']:.2f} req/s"
    )
    print(f"{'class':<9}{'requests':>9}{'attain':>8}{'p50 s':>8}{'p99 s':>8}{'429':>5}")
    for name, c in r["per_class"].items():
        p50 = f"{c['ttft_p50_s']:.2f}" if c["ttft_p50_s"] is not None else "-"
        p99 = f"{c['ttft_p99_s']:.2f}" if c["ttft_p99_s"] is not None else "-"
        print(
            f"{name:<9}{c['requests']:>9}{c['attainment']:>8.3f}{p50:>8}{p99:>8}{c['rejected']:>5}"
        )
    print(f"stable: {r['stable']}; urgent feasible misses by cause: {r['urgent_feasible_misses']}")
    from flowprefill_ray.scheduling.why_late import format_summary

    print(format_summary(r["why_late"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_run(result)
    out = Path(args.out)
    document = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    document["benchmark"] = "why_late_replay"
    document["runs"][args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    print(f"wrote {out} (runs: {', '.join(document['runs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
