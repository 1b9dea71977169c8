"""Command line: ``python -m flowprefill_ray <command>`` (also installed as ``flowprefill``).

Commands:
  demo           the main job: a local Ray cluster, the Serve app with the embedded default
                 model, a short replay of a real trace with mixed SLO classes, a report and plots
  preempt-demo   one long prefill preempted by an urgent short request, on one model in-process
  bench          the full policy comparison on the live system: with no arguments a goodput
                 bisection per policy on the tiny CPU model with the simulator's prediction
                 (BENCH_DEFAULTS below, ~20 min on 2 quiet cores); any arguments go to
                 benchmarks/live_policies.py instead (--help lists them; docs/BENCHMARKS.md)
  prepare-model  convert the embedded SmolLM2 checkpoint once (later runs reuse the cache)
  timeline       RUN_DIR_OR_JSON: why requests were late, from a saved scheduler timeline
                 (timeline.json): prints the causes per SLO class, writes timeline.png beside it
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

from flowprefill_ray.process_env import apply_defaults

# Ray must listen on loopback only, and nothing may be fetched from a model hub. Set before any
# command imports ray or transformers.
apply_defaults()

_MODULE_COMMANDS = {
    "demo": "flowprefill_ray.demos.serving",
    "preempt-demo": "flowprefill_ray.demos.preemption",
    "timeline": "flowprefill_ray.timeline_plot",
}

_REPO = Path(__file__).resolve().parent.parent


def _prepare_model(argv: list[str]) -> int:
    from flowprefill_ray.model.checkpoints import default_checkpoint

    print(default_checkpoint())
    return 0


# `bench` without arguments: every policy's goodput on the live system, bisected on the rate,
# with docs/ENVIRONMENT's tiny model: on 2 CPU cores it loads the prefill worker before the HTTP
# stack saturates, and the simulator's CPU profile prices that very model (docs/BENCHMARKS.md).
BENCH_DEFAULTS = (
    "--tiny", "--mode", "search", "--first-scale", "1", "--max-trials", "6", "--rel-tol", "0.25",
    "--requests", "160", "--prompt-scale", "1", "--max-prompt-tokens", "4096",
    "--slo-scale", "3", "--chunk-size", "512", "--drain", "30", "--simulate",
    "--out", "results/bench.json",
)  # fmt: skip


def _bench(argv: list[str]) -> int:
    # The benchmark scripts live beside the package in the repository (they are not installed).
    script = _REPO / "benchmarks" / "live_policies.py"
    if not script.exists():
        print(f"error: {script} not found; run `bench` from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *(argv or BENCH_DEFAULTS)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "prepare-model":
        return _prepare_model(rest)
    if command == "bench":
        return _bench(rest)
    if command not in _MODULE_COMMANDS:
        print(f"error: unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    module = importlib.import_module(_MODULE_COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
