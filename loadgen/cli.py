"""``python -m loadgen``: replay a trace against an endpoint, or search its goodput.

    python -m loadgen run --url http://127.0.0.1:8000 --model M --trace azure-conv \
        --rate-scale 2 --requests 200 --duration 120 --out results/run1
    python -m loadgen goodput --url ... --model M --trace azure-code --out results/goodput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from flowprefill_ray.scheduling.slo import SLOConfig

from .config import EndpointConfig, ReplayConfig, parse_priority_spec
from .replay_args import add_replay_arguments, replay_config


def _common_args(parser: argparse.ArgumentParser, omit: tuple[str, ...] = ()) -> None:
    end = parser.add_argument_group("endpoint")
    end.add_argument(
        "--url", required=True, help="base URL, e.g. http://127.0.0.1:8000 (with or without /v1)"
    )
    end.add_argument("--model", required=True, help="model name the server expects")
    end.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="completions sends token-id prompts (exact lengths); chat sends text",
    )
    end.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding a Bearer key (unset: no key sent)",
    )
    end.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    end.add_argument("--no-slo", action="store_true", help="do not send slo_class / X-SLO-Class")
    end.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos extension")
    end.add_argument(
        "--priority",
        default=None,
        metavar="auto|CLASS=N,...",
        help="send vLLM's per-request priority field (lower is served first under its "
        "--scheduling-policy priority): 'auto' ranks the SLO classes by TTFT target "
        "(tightest 0), or give each class its integer",
    )

    rep = add_replay_arguments(parser, omit=omit)
    rep.add_argument(
        "--slo-scale",
        type=float,
        default=1.0,
        help="multiplies the TTFT targets of the four classes (text 0.25 s, image 0.5 s, "
        "search 4 s, file 6 s)",
    )
    parser.add_argument("--out", default="results/loadgen", help="output directory")
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _common_args(sub.add_parser("run", help="replay a trace once"))
    goodput = sub.add_parser("goodput", help="bisect the rate scale for >= target TTFT attainment")
    _common_args(goodput, omit=("rate_scale",))  # the search chooses the rate scale
    goodput.add_argument("--target", type=float, default=0.9, help="attainment to hold (0..1)")
    goodput.add_argument("--first-scale", type=float, default=1.0, help="first rate scale tried")
    goodput.add_argument("--max-scale", type=float, default=64.0, help="highest rate scale tried")
    goodput.add_argument(
        "--rel-tol",
        type=float,
        default=0.15,
        help="stop when the bracket is this narrow, relative to its low end",
    )
    goodput.add_argument("--max-trials", type=int, default=8, help="most replays the search runs")
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EndpointConfig, ReplayConfig, SLOConfig]:
    """Validate the CLI's values into the three configs (pydantic errors name the field)."""
    slo = SLOConfig(scale=args.slo_scale)
    priority = None
    if args.priority is not None:
        from .plan import ttft_targets

        priority = parse_priority_spec(args.priority, ttft_targets(slo))
    endpoint = EndpointConfig(
        base_url=args.url,
        model=args.model,
        api=args.api,
        api_key=os.environ.get(args.api_key_env) or None,
        request_timeout_s=args.timeout,
        send_slo=not args.no_slo,
        ignore_eos=args.ignore_eos,
        priority=priority,
    )
    replay = replay_config(args)
    return endpoint, replay, slo


def _run(args: argparse.Namespace) -> int:
    from .output import write_results
    from .replay import replay_trace
    from .server_timeline import save_timeline
    from .summary import format_report, summarize

    endpoint, replay, slo = configs_from_args(args)
    result = asyncio.run(replay_trace(endpoint, replay, slo, progress=not args.no_progress))
    paths = write_results(result, args.out, extra={"slo": slo.model_dump()})
    timeline = save_timeline(endpoint, args.out, len(result.records))

    print(format_report(summarize(result)))
    print(f"wrote {paths['json']} and {paths['csv']}" + (f" and {timeline}" if timeline else ""))
    return 0


def _goodput(args: argparse.Namespace) -> int:
    from flowprefill_ray.simulator.goodput import GoodputSearchConfig

    from .goodput import live_goodput_search

    endpoint, replay, slo = configs_from_args(args)
    search = GoodputSearchConfig(
        target=args.target,
        start=args.first_scale,
        rel_tol=args.rel_tol,
        min_scale=min(0.01, args.first_scale),
        max_scale=args.max_scale,
        max_evaluations=args.max_trials,
    )
    report = live_goodput_search(
        endpoint, replay, slo, Path(args.out), search=search, progress=not args.no_progress
    )
    print(json.dumps({k: report[k] for k in ("goodput_rate_scale", "goodput_rps")}, indent=1))
    for point in report["points"]:
        print(
            f"x{point['rate_scale']:<8.4g} {point['rate_rps']:7.2f} req/s  attainment {point['attainment']:.1%}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return _goodput(args)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
