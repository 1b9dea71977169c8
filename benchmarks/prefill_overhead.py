"""What do pausable prefills cost, and how fast does a pause take effect?

1. Prefill time at several prompt lengths for transformers' forward, ours run straight through
   (operator by operator, no checkpoint checks), and ours with block checkpoints (the pause
   flag read at each one). Target: block checkpoints cost <= 2 % over straight through.
2. Pause latency per granularity: a prefill runs in a thread; another thread raises the pause
   flag at a random moment; latency is the time from raising it until `run()` returns. Beside
   it, the longest compute segment between two checkpoints, which bounds that latency.

Model: random-weight tiny Llama (4 layers, hidden 256, 4/2 heads), fp32.

    .venv/bin/python benchmarks/prefill_overhead.py --threads 1 --out results/prefill_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from model_bench import BENCH_MODEL_SHAPE, random_prompt, sync  # noqa: E402
from provenance import command_line  # noqa: E402

from flowprefill_ray.model import Granularity, LlamaModel, load_model  # noqa: E402
from flowprefill_ray.model.checkpoints import tiny_checkpoint  # noqa: E402


def time_transformers(hf_model, prompt: list[int], device: torch.device) -> float:
    """Seconds for one HF forward with a KV cache, logits for the last token only."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        hf_model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - started


def time_straight(model: LlamaModel, prompt: list[int]) -> float:
    """Seconds for our prefill stepped operator by operator with no checkpoint checks."""
    started = time.perf_counter()
    state = model.start_prefill([prompt])
    while not state.done:
        state.step()
    sync(model.device)
    return time.perf_counter() - started


def time_with_checkpoints(
    model: LlamaModel, prompt: list[int], granularity: Granularity, sync_mode: str
) -> float:
    """Seconds for our prefill via run(), reading a real pause flag at every checkpoint."""
    pause = threading.Event()
    started = time.perf_counter()
    state = model.start_prefill([prompt], granularity=granularity, checkpoint_sync=sync_mode)
    assert state.run(pause.is_set)
    return time.perf_counter() - started


def measure_prefill(model, hf_model, sizes, repeats, device, sync_modes) -> list[dict]:
    rows = []
    for tokens in sizes:
        prompt = random_prompt(tokens, model.config.vocab_size)
        variants = {"transformers": lambda p=prompt: time_transformers(hf_model, p, device)}
        variants["ours straight"] = lambda p=prompt: time_straight(model, p)
        for mode in sync_modes:
            variants[f"ours block ({mode})"] = lambda p=prompt, m=mode: time_with_checkpoints(
                model, p, Granularity.BLOCK, m
            )
        variants["ours operator (sync)"] = lambda p=prompt: time_with_checkpoints(
            model, p, Granularity.OPERATOR, "sync"
        )
        print(f"prefill {tokens} tokens ...", file=sys.stderr, flush=True)
        for run in variants.values():  # warm-up: allocator, thread pools, CUDA kernels
            run()
        # Interleave the variants so slow drift of a shared machine hits all of them alike.
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                samples[name].append(run())
        straight = statistics.median(samples["ours straight"])
        for name, values in samples.items():
            median = statistics.median(values)
            rows.append(
                {
                    "tokens": tokens,
                    "variant": name,
                    "median_s": median,
                    "min_s": min(values),
                    "samples_s": values,
                    "vs_straight_pct": 100.0 * (median / straight - 1.0),
                }
            )
    return rows


def checkpoint_cost_s(model: LlamaModel, rounds: int = 200, estimates: int = 3) -> float:
    """Seconds one checkpoint adds (flag read, device wait, bookkeeping), from a 1-token prompt
    run at operator granularity versus stepped straight; minima over `rounds` interleaved
    runs, smallest of `estimates` such estimates, so a busy machine inflates it little."""
    return min(_checkpoint_cost_estimate(model, rounds) for _ in range(estimates))


def _checkpoint_cost_estimate(model: LlamaModel, rounds: int) -> float:
    pause = threading.Event()
    straight, checked = [], []
    for _ in range(rounds):
        straight.append(time_straight(model, [5]))
        started = time.perf_counter()
        state = model.start_prefill([[5]], granularity=Granularity.OPERATOR)
        state.run(pause.is_set)
        checked.append(time.perf_counter() - started)
    return max(0.0, min(checked) - min(straight)) / state.num_checkpoints


def segment_times(model: LlamaModel, prompt: list[int], granularity: Granularity) -> list[float]:
    """Compute time of each stretch between consecutive checkpoints, seconds."""
    state = model.start_prefill([prompt], granularity=granularity)
    segments = []
    done = False
    while not done:
        before = state.executed_s
        done = state.run_until_checkpoint()
        segments.append(state.executed_s - before)
    return segments


def pause_latencies(
    model: LlamaModel, prompt: list[int], granularity: Granularity, trials: int, seed: int
) -> list[float]:
    """Seconds from raising the pause flag (another thread) until run() returns paused."""
    rng = random.Random(seed)
    full = time_straight(model, prompt)
    latencies = []
    while len(latencies) < trials:
        pause = threading.Event()
        state = model.start_prefill([prompt], granularity=granularity)
        returned_at: list[float] = []

        def runner(state=state, pause=pause, returned_at=returned_at) -> None:
            finished = state.run(pause.is_set)
            returned_at.append(time.perf_counter())
            returned_at.append(finished)

        thread = threading.Thread(target=runner)
        thread.start()
        time.sleep(rng.uniform(0.05, 0.85) * full)
        raised_at = time.perf_counter()
        pause.set()
        thread.join()
        if returned_at[1]:  # finished before the flag was seen: no pause to measure
            continue
        latencies.append(returned_at[0] - raised_at)
    return latencies


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_pauses(model, sizes, trials) -> list[dict]:
    rows = []
    for tokens in sizes:
        prompt = random_prompt(tokens, model.config.vocab_size)
        operator_times = segment_times(model, prompt, Granularity.OPERATOR)
        for granularity in Granularity:
            print(f"pauses {tokens} tokens, {granularity.value} ...", file=sys.stderr, flush=True)
            segments = segment_times(model, prompt, granularity)
            latencies = pause_latencies(model, prompt, granularity, trials, seed=tokens)
            rows.append(
                {
                    "tokens": tokens,
                    "granularity": granularity.value,
                    "checkpoints": len(segments) - 1,
                    "trials": len(latencies),
                    "latency_p50_ms": 1e3 * statistics.median(latencies),
                    "latency_p90_ms": 1e3 * _quantile(latencies, 0.9),
                    "latency_max_ms": 1e3 * max(latencies),
                    "longest_segment_ms": 1e3 * max(segments),
                    "mean_segment_ms": 1e3 * statistics.mean(segments),
                    "longest_operator_ms": 1e3 * max(operator_times),
                    "latencies_ms": [1e3 * x for x in latencies],
                }
            )
    return rows


def print_tables(prefill_rows: list[dict], pause_rows: list[dict]) -> None:
    print(f"\n{'tokens':>6}  {'variant':<22} {'median ms':>10} {'min ms':>9} {'vs straight':>12}")
    for r in prefill_rows:
        print(
            f"{r['tokens']:>6}  {r['variant']:<22} {1e3 * r['median_s']:>10.1f} "
            f"{1e3 * r['min_s']:>9.1f} {r['vs_straight_pct']:>+11.2f}%"
        )
    print(
        f"\n{'tokens':>6}  {'granularity':<9} {'ckpts':>5} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'max ms':>8} {'longest seg ms':>15} {'longest op ms':>14}"
    )
    for r in pause_rows:
        print(
            f"{r['tokens']:>6}  {r['granularity']:<9} {r['checkpoints']:>5} "
            f"{r['latency_p50_ms']:>8.2f} {r['latency_p90_ms']:>8.2f} {r['latency_max_ms']:>8.2f} "
            f"{r['longest_segment_ms']:>15.2f} {r['longest_operator_ms']:>14.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--pause-sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--quick", action="store_true", help="sizes 512 2048, pauses at 2048")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--trials", type=int, default=20, help="pause trials per granularity")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/prefill_overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.pause_sizes = [512, 2048], [2048]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # "bounded" differs from "sync" only on CUDA; on CPU both are no-ops.
    sync_modes = ["sync", "bounded"] if device.type == "cuda" else ["sync"]

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        max_position = max(args.sizes + args.pause_sizes)
        path = tiny_checkpoint(tmp, max_position=max_position, **BENCH_MODEL_SHAPE)
        model = load_model(path, device=device)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        hf_model.eval()
        prefill_rows = measure_prefill(
            model, hf_model, args.sizes, args.repeats, device, sync_modes
        )
        pause_rows = measure_pauses(model, args.pause_sizes, args.trials)
        per_checkpoint_s = checkpoint_cost_s(model)
        block_checkpoints = 2 * model.config.num_hidden_layers
    print_tables(prefill_rows, pause_rows)
    straight = {r["tokens"]: r["median_s"] for r in prefill_rows if r["variant"] == "ours straight"}
    checkpoint_overhead = {
        "per_checkpoint_us": 1e6 * per_checkpoint_s,
        "block_checkpoints": block_checkpoints,
        "block_overhead_pct": {
            n: 100.0 * per_checkpoint_s * block_checkpoints / t for n, t in straight.items()
        },
    }
    print(
        f"\none checkpoint costs {1e6 * per_checkpoint_s:.1f} us (0 means below the timing "
        "noise); block checkpoints add "
        + ", ".join(
            f"{p:.4f} % at {n}" for n, p in checkpoint_overhead["block_overhead_pct"].items()
        )
    )
    report = {
        "command": command_line(__file__, argv),
        "model_shape": BENCH_MODEL_SHAPE,
        "dtype": "float32",
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "prefill": prefill_rows,
        "pause_latency": pause_rows,
        "checkpoint_overhead": checkpoint_overhead,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
