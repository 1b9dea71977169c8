"""Per-request overhead at idle: TTFT through HTTP minus the model's own prefill (issue 17 s2).

    .venv/bin/python benchmarks/request_overhead.py --out results/request_overhead.json

Starts the shipped local app (``deployments/local.yaml``: SmolLM2 on CPU, one prefill and one
decode worker) on 127.0.0.1, except that the TTFT predictor times only up to the longest prompt
sent (start-up time). Then, one request at a time after a warm-up, for each prompt size
(``--sizes``, tokens, sent as token ids so the count is exact) and each request shape:

- ``max_tokens=1``, not streamed: the response is the first token (no decode worker);
- ``max_tokens=2``, streamed: TTFT is the first SSE chunk; the hand-off to decode is on the path.

Right after each request, in this process with the prefill worker's thread count
(``prefill.torch_threads``), the same prompt is prefilled by the project's model as the worker
runs it (``start_prefill`` / ``run`` / ``result`` and the first token's argmax): the pair shares
the machine's load at that moment. Overhead = client TTFT - that prefill, per pair.

Every prompt is new (seeded random ids), so no cache between requests can hide a prefill.
The class is ``file`` (the loosest): the shipped admission control must not turn a long prompt
away; the class changes nothing on the path.

Where the overhead goes comes from the wall-clock stamps each request carries
(``flowprefill_ray.request_clock.HOPS``, returned under ``flowprefill.hops``), between the
client's own stamps before sending and on receiving the first token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from cli_json import json_object

from flowprefill_ray.process_env import apply_defaults
from flowprefill_ray.request_clock import CLIENT_RECEIVED, CLIENT_SENT, hop_segments
from loadgen.client import sse_lines_of
from loadgen.stats import percentile

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"max1": (1, False), "stream2": (2, True)}
SLO_CLASS = "file"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/request_overhead.json")
    p.add_argument("--sizes", default="16,128,512", help="prompt lengths, tokens, comma-separated")
    p.add_argument("--repeats", type=int, default=20, help="measured requests per size and shape")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests first")
    p.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"request shapes, comma-separated, of {', '.join(SHAPES)}",
    )
    p.add_argument("--model", default=None, help="model path (default: local.yaml's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runtime-json",
        default="{}",
        help="runtime fields merged over local.yaml's, one level deep (an A/B), e.g. "
        '\'{"placement": {"worker_niceness": 15}}\'',
    )
    p.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in this process's environment before Ray starts, so every Ray process "
        "inherits it (an A/B of Ray Serve's own switches, e.g. "
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)",
    )
    args = p.parse_args(argv)
    args.ray_env_vars = {}
    for item in args.ray_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--ray-env wants NAME=VALUE, got {item!r}")
        args.ray_env_vars[name] = value
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be whole numbers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes needs positive token counts")
    args.shapes = args.shapes.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown --shapes {unknown}; known: {list(SHAPES)}")
    try:
        args.runtime_json = json_object(args.runtime_json, "--runtime-json")
    except ValueError as error:
        p.error(str(error))
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """local.yaml's app args, the predictor's profile cut at the longest prompt sent."""
    import yaml

    from flowprefill_ray.runtime.config import PrefillConfig
    from flowprefill_ray.serve.config import ServeAppArgs

    deploy = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    deploy = deploy["applications"][0]["args"]
    runtime = deploy["runtime"]
    if args.model is not None:
        runtime["model"]["path"] = args.model
    for key, value in args.runtime_json.items():
        runtime[key] = {**runtime.get(key, {}), **value} if isinstance(value, dict) else value
    runtime["prefill"]["profile_tokens"] = list(
        PrefillConfig().profile_lengths(max(max(args.sizes), 64))
    )
    return ServeAppArgs.model_validate(deploy).model_dump(mode="json")


class InProcessPrefill:
    """The served model in this process, prefilling as a prefill worker does."""

    def __init__(self, runtime: dict[str, Any]):
        import torch

        from flowprefill_ray.runtime.config import RuntimeConfig
        from flowprefill_ray.runtime.model_source import load_source_model

        config = RuntimeConfig.model_validate(runtime)
        self.threads = config.prefill.torch_threads
        torch.set_num_threads(self.threads)
        # Loaded exactly as the prefill worker loads it: the oneDNN matmul backend included
        # (without it this reference ran on torch's F.linear, slower than the worker, and the
        # overhead came out negative: docs/results/request_overhead_nice0.json).
        self.model = load_source_model(config.model)
        self.granularity = config.prefill.granularity
        self.sync = config.prefill.sync_mode(self.model.device.type)
        self.vocab = self.model.config.vocab_size

    def seconds(self, tokens: list[int]) -> float:
        started = time.perf_counter()
        state = self.model.start_prefill(
            [tokens], granularity=self.granularity, checkpoint_sync=self.sync
        )
        state.run(lambda: False)
        int(state.result().last_logits[0].argmax())
        return time.perf_counter() - started


def send(http, model: str, tokens: list[int], max_tokens: int, stream: bool) -> dict[str, Any]:
    """One request; its client TTFT (s) and the server's hop stamps with the client's."""
    body = {
        "model": model,
        "prompt": tokens,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "slo_class": SLO_CLASS,
        "stream": stream,
    }
    sent_wall, started = time.time(), time.perf_counter()
    if not stream:
        response = http.post("/v1/completions", json=body)
        ttft = time.perf_counter() - started
        received_wall = time.time()
        response.raise_for_status()
        server = response.json()["flowprefill"]
    else:
        ttft, received_wall, server = None, None, None
        with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in sse_lines_of(response.iter_text()):
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - started
                    received_wall = time.time()
                if line != "data: [DONE]":
                    server = json.loads(line[6:]).get("flowprefill") or server
    hops = {CLIENT_SENT: sent_wall, **server["hops"], CLIENT_RECEIVED: received_wall}
    return {"ttft_s": ttft, "server_ttft_s": server["ttft_s"], "hops": hops}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p90 of TTFT and overhead, p50 of the prefill and of each hop (seconds)."""
    ttft = [s["ttft_s"] for s in samples]
    prefill = [s["prefill_s"] for s in samples]
    overhead = [s["ttft_s"] - s["prefill_s"] for s in samples]
    # The worker's unit (start to end of its compute) beyond the same prompt's prefill here.
    excess = [s["hops"]["worker_end"] - s["hops"]["worker_start"] - s["prefill_s"] for s in samples]
    segments: dict[str, list[float]] = {}
    for s in samples:
        for name, gap in hop_segments(s["hops"]).items():
            segments.setdefault(name, []).append(gap)
    return {
        "n": len(samples),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "prefill_p50_s": percentile(prefill, 50),
        "overhead_p50_s": percentile(overhead, 50),
        "overhead_p90_s": percentile(overhead, 90),
        "server_ttft_p50_s": percentile([s["server_ttft_s"] for s in samples], 50),
        "worker_excess_p50_s": percentile(excess, 50),
        "worker_excess_p90_s": percentile(excess, 90),
        "hops_p50_s": {name: percentile(gaps, 50) for name, gaps in segments.items()},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from flowprefill_ray.demos.local_serve import LocalServe, served_model_name

    deploy = app_args(args)
    model_name = served_model_name(deploy)
    rng = random.Random(args.seed)
    rows = []
    with LocalServe(deploy) as served:
        local = InProcessPrefill(deploy["runtime"])

        def prompt(size: int) -> list[int]:
            # Ids away from the special tokens at the start of the vocabulary.
            return [rng.randrange(100, local.vocab) for _ in range(size)]

        with httpx.Client(base_url=served.url, timeout=300.0) as http:
            for _ in range(args.warmup):
                for size in args.sizes:
                    send(http, model_name, prompt(size), 1, False)
                    local.seconds(prompt(size))
            for shape in args.shapes:
                max_tokens, stream = SHAPES[shape]
                for size in args.sizes:
                    samples = []
                    for _ in range(args.repeats):
                        tokens = prompt(size)
                        sample = send(http, model_name, tokens, max_tokens, stream)
                        sample["prefill_s"] = local.seconds(tokens)
                        samples.append(sample)
                    rows.append({"shape": shape, "tokens": size, **summarize(samples)})
                    rows[-1]["samples"] = samples
                    print_row(rows[-1])
    return {"threads": local.threads, "app_args": deploy, "rows": rows}


def print_row(row: dict[str, Any]) -> None:
    ms = 1000.0
    print(
        f"{row['shape']:>8} {row['tokens']:>5} tokens: TTFT p50 {row['ttft_p50_s'] * ms:.1f} "
        f"p90 {row['ttft_p90_s'] * ms:.1f} | prefill p50 {row['prefill_p50_s'] * ms:.1f} | "
        f"overhead p50 {row['overhead_p50_s'] * ms:.1f} p90 {row['overhead_p90_s'] * ms:.1f} ms",
        flush=True,
    )


def print_tables(rows: list[dict[str, Any]]) -> None:
    ms = 1000.0
    print(
        "\n| shape | tokens | TTFT p50 | TTFT p90 | prefill p50 | overhead p50 | overhead p90 "
        "| worker - prefill p50 | p90 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['tokens']} | {r['ttft_p50_s'] * ms:.1f} | "
            f"{r['ttft_p90_s'] * ms:.1f} | {r['prefill_p50_s'] * ms:.1f} | "
            f"{r['overhead_p50_s'] * ms:.1f} | {r['overhead_p90_s'] * ms:.1f} | "
            f"{r['worker_excess_p50_s'] * ms:.1f} | {r['worker_excess_p90_s'] * ms:.1f} |"
        )
    names = list(dict.fromkeys(n for r in rows for n in r["hops_p50_s"]))
    print("\nHops, p50 ms:\n")
    print("| hop | " + " | ".join(f"{r['shape']} {r['tokens']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        cells = [
            f"{r['hops_p50_s'][name] * ms:.1f}" if name in r["hops_p50_s"] else "-" for r in rows
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: provenance records the load average when it is imported, and
    # tests load this module for its parser alone.
    from provenance import write_report

    args = parse_args(argv)
    # Before Ray starts: every Ray process inherits the environment of the one that starts it.
    os.environ.update(args.ray_env_vars)
    result = run(args)
    print_tables(result["rows"])
    write_report(
        args.out,
        __file__,
        argv,
        "request_overhead",
        sizes=args.sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        slo_class=SLO_CLASS,
        runtime_overrides=args.runtime_json,
        ray_env=args.ray_env,
        **result,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
