"""The main job: FlowPrefill serving a real trace on a local Ray cluster, end to end.

``python -m flowprefill_ray demo`` (or ``bash run.sh demo``):

1. starts a local Ray cluster (127.0.0.1 only) and deploys the Serve app with the embedded
   default model (SmolLM2-135M; ``--tiny`` uses the generated tiny model instead);
2. replays a slice of the Azure 2023 conversation trace through the OpenAI-compatible HTTP
   API with the open-loop load generator, each request carrying one of four SLO classes;
3. prints TTFT p50/p99 and attainment per class, preemptions and a goodput estimate;
4. writes ``results.json``, ``requests.csv``, ``ttft_cdf.png``, ``burst_timeline.png``, the
   scheduler's ``timeline.json`` and its Gantt chart ``timeline.png`` to the output directory
   (default ``out/demo``), and prints why each missed request was late;
5. shuts Serve and Ray down, also on Ctrl-C, SIGTERM or an error.

Why the workload is reshaped. The trace was served by GPUs; on two CPU cores SmolLM2 prefills
about 500 tokens per second, so the replay keeps the trace's arrival pattern and class mix but
scales prompt lengths by ``--prompt-scale`` (default 0.1, capped at ``--max-prompt-tokens``),
caps answers at ``--max-output-tokens`` (decode shares the same two cores), slows arrivals
with ``--rate-scale`` and multiplies the paper's TTFT targets (text 0.25 s, image 0.5 s, search
4 s, file 6 s) by ``--slo-scale``. The defaults were chosen so that queues form in the trace's
bursts, the regime where head-of-line blocking decides who meets the SLO: in the run recorded
in docs/BENCHMARKS.md the scheduler preempted 15 times and 87.5 % of requests met their SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flowprefill_ray.process_env import apply_defaults

# Before anything imports ray: every Ray listener on loopback, the front end at the workers'
# priority, no model-hub downloads.
apply_defaults()


def build_parser() -> argparse.ArgumentParser:
    from flowprefill_ray.scheduling import POLICIES
    from loadgen.replay_args import CPU_SLICE_DEFAULTS, add_replay_arguments

    parser = argparse.ArgumentParser(
        prog="python -m flowprefill_ray demo",
        description="Serve a real trace slice with FlowPrefill on a local Ray cluster and report.",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the generated tiny model (tests, quick looks)"
    )
    parser.add_argument("--policy", default="flowprefill", choices=sorted(POLICIES))
    parser.add_argument("--out", default="out/demo", help="output directory")
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port on 127.0.0.1 (default: a free one)"
    )
    # A short slice scaled to two CPU cores (see the module docstring for why these values).
    add_replay_arguments(parser, **CPU_SLICE_DEFAULTS, max_requests=48, rate_scale=0.6)
    parser.add_argument(
        "--slo-scale", type=float, default=4.0, help="multiplies the four classes' TTFT targets"
    )
    parser.add_argument("--prefill-workers", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve app's args for the demo (validated by the app's ``ServeAppArgs``)."""
    from flowprefill_ray.demos.local_serve import serve_app_args

    return serve_app_args(
        "tiny" if args.tiny else "default",
        {"name": args.policy},
        args.slo_scale,
        num_prefill_workers=args.prefill_workers,
        profile_max_tokens=args.max_prompt_tokens,
    )


def _raise_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM becomes an exception so the `with` blocks below shut Serve and Ray down.
    raise KeyboardInterrupt(f"signal {signum}")


def goodput_estimate(summary: dict[str, Any], target: float = 0.9) -> dict[str, Any]:
    """What one run says about goodput (the highest rate with >= ``target`` TTFT attainment):
    at or above the replayed rate if this run held the target, below it otherwise. The exact
    value needs a rate search (``python -m loadgen goodput`` or ``bench``)."""
    rate = summary["request_rate_rps"]
    attainment = summary["overall"]["attainment"]
    held = attainment is not None and attainment >= target
    return {
        "replayed_rate_rps": rate,
        "attainment": attainment,
        "slo_meeting_rps": summary["overall"]["goodput_rps"],
        "goodput_bound": (">=" if held else "<") + (f" {rate:.2f} req/s" if rate else " (no rate)"),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flowprefill_ray.demos.local_serve import LocalServe
    from flowprefill_ray.scheduling.why_late import format_summary
    from flowprefill_ray.serve.config import ServeAppArgs
    from flowprefill_ray.timeline_plot import draw_gantt
    from loadgen import EndpointConfig, format_report, summarize, write_results
    from loadgen.plan import load_trace_workload, plan_requests, ttft_targets
    from loadgen.plots import plot_burst_timeline, plot_ttft_cdf
    from loadgen.replay_args import replay_config
    from loadgen.runner import run_open_loop
    from loadgen.server_timeline import save_timeline

    deploy = app_args(args)
    validated = ServeAppArgs.model_validate(deploy)
    replay = replay_config(args)
    plan = plan_requests(
        load_trace_workload(args.trace), replay, ttft_targets(validated.runtime.slo)
    )
    out = Path(args.out)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.perf_counter()
    try:
        print(
            f"[demo] starting Ray and deploying {validated.served_model_name()} "
            f"(policy {args.policy}); first start converts the model, ~1 min",
            flush=True,
        )
        with LocalServe(deploy, port=args.port) as live:
            ready_s = time.perf_counter() - started
            print(
                f"[demo] serving at {live.url} after {ready_s:.0f} s; replaying {len(plan)} "
                f"requests of {args.trace}",
                flush=True,
            )
            endpoint = EndpointConfig(base_url=live.url, model=validated.served_model_name())
            result = asyncio.run(
                run_open_loop(endpoint, replay, plan, progress=not args.no_progress)
            )
            # While the server is still up: what its scheduler did with every request.
            timeline_path = save_timeline(endpoint, out, len(plan))
    except KeyboardInterrupt:
        print("[demo] interrupted; Serve and Ray were shut down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)

    summary = summarize(result)
    estimate = goodput_estimate(summary)
    paths = write_results(result, out, extra={"deployment": deploy, "goodput_estimate": estimate})
    plot_ttft_cdf(
        result.records,
        out / "ttft_cdf.png",
        title=f"TTFT per SLO class, {args.policy}, {args.trace}",
    )
    plot_burst_timeline(result.records, out / "burst_timeline.png")
    (out / "summary.json").write_text(
        json.dumps({"summary": summary, "goodput_estimate": estimate}, indent=1)
    )

    print()
    print(
        f"FlowPrefill demo: {validated.served_model_name()}, policy {args.policy}, "
        f"{args.trace} x{args.rate_scale:g} rate, prompts x{args.prompt_scale:g}, SLO x{args.slo_scale:g}"
    )
    print(format_report(summary))
    print(
        f"goodput estimate: {estimate['goodput_bound']} (DistServe: highest rate with >= 90 % "
        f"TTFT attainment); {estimate['slo_meeting_rps'] or 0:.2f} SLO-meeting req/s at this rate"
    )
    written = [paths["json"], paths["csv"], out / "ttft_cdf.png", out / "burst_timeline.png"]
    if timeline_path is not None:
        timeline = json.loads(timeline_path.read_text())
        print("why the missed requests were late (scheduler timeline):")
        print(format_summary(timeline["why_late_summary"]))
        written += [timeline_path, draw_gantt(timeline, out / "timeline.png", timeline["why_late"])]
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
