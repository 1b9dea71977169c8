"""Streamed requests per second through one ingress replica and through two (issue 16 s4).

    .venv/bin/python benchmarks/ingress_scaling.py --out results/ingress_scaling.json

Starts a local Ray cluster (loopback only) and deploys the Serve app with the tiny model on CPU
(one prefill and one decode worker, loose SLOs, no admission control), once per replica count
(``--replicas``, default 1,2: ``OpenAIIngress`` replicas over the one ``EngineService``). For
each, closed-loop: ``--concurrency`` clients (each step of the list in turn) each send a
streamed completion (``--max-tokens`` 8, a short new prompt), read it to ``[DONE]`` and send
the next, for ``--seconds``. Reported per step: completed requests per second, end-to-end and
first-chunk latency p50/p99, errors, and how many requests each replica served (the
``X-FlowPrefill-Replica`` header). ``--repeats N`` runs the whole list N times, the replica
counts interleaved (1, 2, 1, 2, ...), so that each count is measured beside the other under
the same machine state; the summary gives each step's mean and range and the per-repeat
ratio of every count to the first.

The clients are one asyncio process on the same machine: on a small machine they, the
ingress replicas and the workers share the cores, which bounds what a second replica can add.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections import Counter
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPLICA_HEADER = "X-FlowPrefill-Replica"
APP_NAME = "flowprefill-ingress-scaling"
MODEL = "flowprefill-tiny"


def _ints(p: argparse.ArgumentParser, name: str, raw: str) -> list[int]:
    try:
        values = [int(v) for v in raw.split(",")]
    except ValueError:
        p.error(f"--{name} must be whole numbers, comma-separated, got {raw!r}")
    if not values or min(values) < 1:
        p.error(f"--{name} needs positive numbers")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/ingress_scaling.json")
    p.add_argument("--replicas", default="1,2", help="ingress replica counts, comma-separated")
    p.add_argument("--concurrency", default="8,32", help="closed-loop clients, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per step")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured time per step first")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="where the tiny model is generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds over --replicas, interleaved")
    args = p.parse_args(argv)
    args.replicas = _ints(p, "replicas", args.replicas)
    args.concurrency = _ints(p, "concurrency", args.concurrency)
    if args.seconds <= 0 or args.warmup_s < 0 or args.max_tokens < 1 or args.prompt_tokens < 1:
        p.error("--seconds, --max-tokens and --prompt-tokens must be positive")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    model = {"path": "tiny"}
    if args.cache_dir:
        model["cache_dir"] = args.cache_dir
    return {
        "runtime": {
            "model": model,
            "placement": {"prefill_num_cpus": 0.5, "decode_num_cpus": 0.5},
            "prefill": {"profile_tokens": [16, 64, 128, 256], "profile_repeats": 1},
            "decode": {"kv_blocks": 1024, "block_size": 16, "max_batch_size": 64},
            "slo": {"scale": 100.0},  # measure the ingress, not the SLO policy's refusals
            "name_prefix": "fp-ingress-bench",
        },
        "api": {"default_max_tokens": args.max_tokens},
    }


async def _client(http, body_of, stop_at: float, measure_from: float, samples: list) -> None:
    from loadgen.client import sse_lines

    while (now := time.monotonic()) < stop_at:
        sent = now
        first = None
        try:
            async with http.stream("POST", "/v1/completions", json=body_of()) as response:
                replica = response.headers.get(REPLICA_HEADER, "?")
                ok = response.status_code == 200
                async for line in sse_lines(response.aiter_text()):
                    if first is None and line.startswith("data: "):
                        first = time.monotonic()
                    if line == "data: [DONE]":
                        break
        except Exception:  # noqa: BLE001 - counted as an error, the loop goes on
            ok, replica = False, "?"
        done = time.monotonic()
        if sent >= measure_from and done <= stop_at:
            samples.append((ok, replica, done - sent, (first or done) - sent))


async def _step(url: str, concurrency: int, args, rng: random.Random) -> dict[str, Any]:
    import httpx

    def body() -> dict:
        prompt = [rng.randrange(20, 400) for _ in range(args.prompt_tokens)]
        return {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "slo_class": "file",
            "stream": True,
        }

    samples: list = []
    start = time.monotonic()
    measure_from = start + args.warmup_s
    stop_at = measure_from + args.seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as http:
        await asyncio.gather(
            *(_client(http, body, stop_at, measure_from, samples) for _ in range(concurrency))
        )
    good = [s for s in samples if s[0]]
    e2e = sorted(s[2] for s in good) or [float("nan")]
    first = sorted(s[3] for s in good) or [float("nan")]
    return {
        "concurrency": concurrency,
        "completed": len(good),
        "errors": len(samples) - len(good),
        "requests_per_s": len(good) / args.seconds,
        "e2e_p50_s": statistics.median(e2e),
        "e2e_p99_s": e2e[min(len(e2e) - 1, int(0.99 * len(e2e)))],
        "first_chunk_p50_s": statistics.median(first),
        "first_chunk_p99_s": first[min(len(first) - 1, int(0.99 * len(first)))],
        "per_replica": dict(Counter(s[1] for s in good)),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from flowprefill_ray.demos.local_serve import free_port
    from flowprefill_ray.serve.app import compose_app

    rng = random.Random(args.seed)
    rows = []
    port = free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for repeat in range(args.repeats):
            for replicas in args.replicas:
                app = compose_app(app_args(args), ingress_options={"num_replicas": replicas})
                serve.run(app, name=APP_NAME, route_prefix="/")  # returns once all are up
                for concurrency in args.concurrency:
                    row = {"repeat": repeat, "replicas": replicas}
                    url = f"http://127.0.0.1:{port}"
                    row.update(asyncio.run(_step(url, concurrency, args, rng)))
                    rows.append(row)
                    print_row(row)
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def summarize(rows: list[dict[str, Any]], replicas: list[int]) -> list[dict[str, Any]]:
    """Per (replicas, clients): mean and range of req/s over the repeats, and the ratio to
    the first replica count's rate in the same repeat (mean and range)."""
    rate = {(r["repeat"], r["replicas"], r["concurrency"]): r["requests_per_s"] for r in rows}
    out = []
    for (repeat, n, clients), _ in sorted(rate.items()):
        if repeat != 0:
            continue
        rates = [v for (_, m, c), v in rate.items() if (m, c) == (n, clients)]
        ratios = [
            v / rate[(rep, replicas[0], c)]
            for (rep, m, c), v in rate.items()
            if (m, c) == (n, clients) and rate.get((rep, replicas[0], c))
        ]
        out.append(
            {
                "replicas": n,
                "concurrency": clients,
                "repeats": len(rates),
                "requests_per_s_mean": statistics.fmean(rates),
                "requests_per_s_range": [min(rates), max(rates)],
                "ratio_to_first_mean": statistics.fmean(ratios) if ratios else None,
                "ratio_to_first_range": [min(ratios), max(ratios)] if ratios else None,
            }
        )
    return out


def print_row(r: dict[str, Any]) -> None:
    ms = 1000.0
    print(
        f"| {r['replicas']} | {r['concurrency']} | {r['requests_per_s']:.1f} | "
        f"{r['e2e_p50_s'] * ms:.0f} | {r['e2e_p99_s'] * ms:.0f} | "
        f"{r['first_chunk_p50_s'] * ms:.0f} | {r['first_chunk_p99_s'] * ms:.0f} | "
        f"{r['errors']} | {sorted(r['per_replica'].values(), reverse=True)} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: provenance records the load average when it is imported.
    from provenance import write_report

    args = parse_args(argv)
    print(
        "| replicas | clients | req/s | e2e p50 ms | e2e p99 ms | first chunk p50 ms "
        "| p99 ms | errors | requests per replica |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = run(args)
    summary = summarize(rows, args.replicas)
    print(
        "\n| replicas | clients | req/s mean (range) | x first count (range) |\n|---|---|---|---|"
    )
    for r in summary:
        lo, hi = r["requests_per_s_range"]
        rlo, rhi = r["ratio_to_first_range"]
        print(
            f"| {r['replicas']} | {r['concurrency']} | {r['requests_per_s_mean']:.1f} "
            f"({lo:.1f}-{hi:.1f}) | {r['ratio_to_first_mean']:.2f} ({rlo:.2f}-{rhi:.2f}) |"
        )
    write_report(
        args.out,
        __file__,
        argv,
        "ingress_scaling",
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        app_args=app_args(args),
        repeats=args.repeats,
        rows=rows,
        summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
