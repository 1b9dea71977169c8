"""Memory and speed of the CPU matmul paths over many token counts (model/cpu_matmul.py).

    .venv/bin/python benchmarks/cpu_matmul_memory.py --out docs/results/cpu_matmul_memory.json

A serving worker meets a new token count (rows of its matmuls) with nearly every batch, and
oneDNN builds and caches a primitive per shape. Each case runs in a fresh process (the cache
capacities are read once, at a process's first oneDNN call): it loads the model, runs one
warm-up prefill, then ``--rounds`` rounds of prefills at every token count 1..``--max-tokens``
in a shuffled order, and reports the resident memory each round added over the warm-up and its
time; then the median of ``--same-repeats`` prefills at 16 and at 128 tokens (cache hits).

Cases: ``torch`` (``F.linear``), and ``onednn`` with both caches (``LRU_CACHE_CAPACITY``,
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) at each ``--caps`` value (1024 is the libraries' own
default, i.e. uncapped). The cases are interleaved ``--repeats`` times, so a drift of the
machine hits each case alike. One torch thread, as a prefill worker runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_report

CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default", help="ModelSource.path: default | tiny | a dir")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--same-repeats", type=int, default=9)
    p.add_argument("--caps", default="1024,64,16", help="oneDNN cache entries, comma list")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    p.add_argument("--out", default="results/cpu_matmul_memory.json")
    return p.parse_args(argv)


def run_case(args: argparse.Namespace) -> dict:
    """In this (fresh) process: one case, ``--case matmul:cap``."""
    matmul, cap = args.case.split(":")
    if cap != "-":
        for name in CACHE_VARIABLES:
            os.environ[name] = cap
    import torch

    from flowprefill_ray.model import load_model
    from flowprefill_ray.runtime.config import ModelSource
    from flowprefill_ray.runtime.model_source import checkpoint_path

    torch.set_num_threads(1)
    model = load_model(checkpoint_path(ModelSource(path=args.model)), cpu_matmul=matmul)

    def rss_mib() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def prefill(tokens: int) -> float:
        started = time.perf_counter()
        model.prefill([5 + i % 200 for i in range(tokens)])
        return time.perf_counter() - started

    prefill(16)
    base = rss_mib()
    counts = list(range(1, args.max_tokens + 1))
    random.Random(0).shuffle(counts)
    rounds = []
    for _ in range(args.rounds):
        seconds = sum(prefill(n) for n in counts)
        rounds.append({"seconds": round(seconds, 3), "rss_growth_mib": round(rss_mib() - base, 1)})
    same = {
        str(n): round(statistics.median(prefill(n) for _ in range(args.same_repeats)) * 1e3, 2)
        for n in (16, 128)
    }
    return {
        "matmul": model.matmul,
        "cache_entries": {name: os.environ.get(name) for name in CACHE_VARIABLES},
        "rounds": rounds,
        "same_tokens_ms": same,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return {}
    cases = ["torch:-", *(f"onednn:{int(cap)}" for cap in args.caps.split(","))]
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            own = [
                "--case", case, "--model", args.model, "--max-tokens", str(args.max_tokens),
                "--rounds", str(args.rounds), "--same-repeats", str(args.same_repeats),
            ]  # fmt: skip
            done = subprocess.run(
                [sys.executable, __file__, *own], capture_output=True, text=True, env=env
            )
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
            results[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{'case':<16}{'growth MiB per round':>28}{'round s':>22}{'16 tok ms':>12}{'128 tok ms':>12}"
    )
    for case, runs in results.items():
        growth = " / ".join(f"{r['rss_growth_mib']:.0f}" for run in runs for r in run["rounds"])
        secs = " / ".join(f"{r['seconds']:.1f}" for run in runs for r in run["rounds"])
        same16 = statistics.median(run["same_tokens_ms"]["16"] for run in runs)
        same128 = statistics.median(run["same_tokens_ms"]["128"] for run in runs)
        print(f"{case:<14} {growth:<30} {secs:<30} {same16:.1f} / {same128:.1f}")
    fields = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "torch_threads": 1,
        "cases": results,
    }
    write_report(args.out, __file__, argv, "cpu_matmul_memory", **fields)
    return fields


if __name__ == "__main__":
    main()
