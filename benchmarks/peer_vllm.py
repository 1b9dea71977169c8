"""Our shipped deployment against vLLM on CPU, same model, same cores, same requests (issue 14, §4).

    .venv/bin/python benchmarks/peer_vllm.py --out docs/results/peer_vllm_cpu.json   # hours
    .venv/bin/python benchmarks/peer_vllm.py --smoke --out /tmp/peer_vllm_smoke.json  # minutes
    bash run.sh bench-peer [ARGS]                                                  # the same

Systems (``--systems``, the first is the reference whose capacity sets the rate grid):

- ``flowprefill``: ``deployments/local.yaml``'s Serve app (SmolLM2 fp32 on CPU, the shipped
  policy and admission control), its SLO classes at ``--slo-scale``;
- ``vllm-priority`` / ``vllm-fcfs``: ``vllm-cpu`` 0.32 (``benchmarks/vllm_server.py``, its own
  venv) serving the very safetensors directory our deployment converts from the embedded GGUF,
  once per ``--max-num-batched-tokens`` value. Under ``priority`` every request carries its
  class's ``priority`` (tightest TTFT target 0; lower is served first).

Both run on the cores of ``--cores`` (this process's CPU affinity, inherited by Ray and by
vLLM). Each system's session: start it, ask one greedy chat question (every system must give
the same answer), measure its capacity (a burst of the trace's requests), then run the grid of
steady trials (``peer_steady.py``: >= 180 s and >= 300 requests after a 30 s warm-up, unstable
when the backlog does not drain within 2x the loosest SLO), the grid being fractions of the
reference system's capacity; ``--repeats`` sessions per system. Requests are the trace's, at
the same rate the same requests for every system (``loadgen``, open loop, token-id prompts,
``ignore_eos``, outputs capped). The JSON has each system's goodput (the highest grid rate that
held 90 % TTFT attainment in every repeat), the ratios against vLLM, per-class attainment and
TTFT percentiles per trial, the servers' flags, thread binding, command, commit and machine.

``--smoke``: one short trial per system at a low rate, to check the whole path; its JSON says
``"smoke": true`` and is no result. Commands and timings: docs/BENCHMARKS.md, "vLLM on CPU as a
peer".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peer_steady import (  # noqa: E402
    SteadyRules,
    grid_goodput,
    grid_rates,
    measure_capacity,
    steady_trial,
    trace_offsets_s,
)
from vllm_server import VllmFlags  # noqa: E402

GREEDY_QUESTION = "What is the capital of France?"
# --smoke: the whole path once, quickly: no figure from it means anything.
SMOKE = dict(
    repeats=1,
    fractions="0.3",
    min_steady_s=45.0,
    min_requests=0,
    warmup_s=10.0,
    capacity_requests=12,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from loadgen.replay_args import CPU_SLICE_DEFAULTS, add_replay_arguments

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--systems", default="flowprefill,vllm-priority,vllm-fcfs")
    p.add_argument("--smoke", action="store_true", help="one short low-rate trial per system")
    p.add_argument(
        "--cores", default=None, help="CPU ids for every server, e.g. 0-1 (default: all)"
    )
    p.add_argument("--repeats", type=int, default=2, help="sessions per system")
    p.add_argument("--fractions", default="0.4,0.6,0.8,1.0,1.2", help="rates, x capacity")
    p.add_argument("--capacity-rps", type=float, default=None, help="skip measuring; use this")
    p.add_argument("--capacity-requests", type=int, default=60, help="burst size (requests)")
    p.add_argument("--min-steady-s", type=float, default=180.0)
    p.add_argument("--min-requests", type=int, default=300)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--target", type=float, default=0.9, help="TTFT attainment to hold (0..1)")
    p.add_argument("--max-num-batched-tokens", default="256,1024", help="vLLM sweep, comma list")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--vllm-kvcache-gib", type=int, default=1)
    p.add_argument("--vllm-omp-threads-bind", default="auto")
    # The SmolLM2 slice of docs/BENCHMARKS.md (prompts x0.1 capped at 384, 8 output tokens).
    add_replay_arguments(
        p,
        omit=("rate_scale", "max_requests", "duration_s", "drain_s"),
        **{k: v for k, v in CPU_SLICE_DEFAULTS.items() if k not in ("duration_s", "drain_s")},
    )
    p.add_argument("--slo-scale", type=float, default=4.0)
    p.add_argument("--run-dir", default="results/peer_vllm", help="trials' records, server logs")
    p.add_argument("--out", default="results/peer_vllm_cpu.json")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def systems(args: argparse.Namespace) -> list[tuple[str, VllmFlags | None]]:
    """``(name, vLLM flags or None for ours)`` per system, in the order they run."""
    budgets = [int(b) for b in args.max_num_batched_tokens.split(",") if b.strip()]
    chosen: list[tuple[str, VllmFlags | None]] = []
    for name in (s.strip() for s in args.systems.split(",") if s.strip()):
        if name == "flowprefill":
            chosen.append((name, None))
        elif name in ("vllm-priority", "vllm-fcfs"):
            for budget in budgets:
                flags = VllmFlags(
                    scheduling_policy=name.removeprefix("vllm-"),
                    max_num_batched_tokens=budget,
                    max_num_seqs=args.max_num_seqs,
                    kvcache_gib=args.vllm_kvcache_gib,
                    omp_threads_bind=args.vllm_omp_threads_bind,
                )
                chosen.append((flags.name, flags))
        else:
            raise ValueError(f"unknown system {name!r}: flowprefill, vllm-priority, vllm-fcfs")
    return chosen


def our_app_args(slo_scale: float) -> dict[str, Any]:
    """deployments/local.yaml's app, its four SLO classes at ``slo_scale`` (the client's)."""
    from why_late_replay import shipped_args

    from flowprefill_ray.serve.config import ServeAppArgs

    deploy = shipped_args()
    deploy["runtime"]["slo"] = {**deploy["runtime"]["slo"], "scale": slo_scale}
    return ServeAppArgs.model_validate(deploy).model_dump(mode="json")


def request_priorities(flags: VllmFlags | None, slo: Any) -> dict[str, int] | None:
    """The ``priority`` per SLO class a system gets: by TTFT target under vLLM's priority
    policy; none for fcfs (vLLM refuses a non-zero priority there) nor for ours (it reads
    ``slo_class``)."""
    from loadgen.config import priority_by_target
    from loadgen.plan import ttft_targets

    if flags is None or flags.scheduling_policy != "priority":
        return None
    return priority_by_target(ttft_targets(slo))


@contextlib.contextmanager
def serving(
    name: str, flags: VllmFlags | None, args: argparse.Namespace, slo: Any, log_dir: Path
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One session of a system: yields its endpoint and what to record about it; stops it
    (and every process it started) on leaving, also on an error or Ctrl-C."""
    from vllm_server import VllmServer

    from flowprefill_ray.demos.local_serve import LocalServe, free_port, served_model_name
    from flowprefill_ray.model.checkpoints import default_checkpoint
    from loadgen import EndpointConfig

    deploy = our_app_args(args.slo_scale)
    model = served_model_name(deploy)
    started = time.perf_counter()
    if flags is None:
        with LocalServe(deploy) as live:
            runtime = deploy["runtime"]
            info = {
                "startup_s": time.perf_counter() - started,
                "policy": runtime["policy"],
                "slo": runtime["slo"],
                "torch_threads": {
                    "prefill": runtime["prefill"]["torch_threads"],
                    "decode": runtime["decode"]["torch_threads"],
                },
                "placement": runtime["placement"],
            }
            yield EndpointConfig(base_url=live.url, model=model, ignore_eos=True), info
        return
    server = VllmServer(default_checkpoint(), model, free_port(), flags, log_dir / f"{name}.log")
    with server:
        info = {
            "startup_s": server.startup_s,
            "flags": flags.model_dump(),
            "command": server.command,
            "environment": server.environment,
            "thread_binding": server.thread_binding(),
        }
        endpoint = EndpointConfig(
            base_url=server.url,
            model=model,
            ignore_eos=True,
            send_slo=False,  # vLLM warns on every unknown field; it reads priority instead
            priority=request_priorities(flags, slo),
        )
        yield endpoint, info


def greedy_answer(endpoint: Any) -> str:
    """The system's greedy chat answer to ``GREEDY_QUESTION`` (16 tokens at most)."""
    import httpx

    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": GREEDY_QUESTION}],
        "max_tokens": 16,
        "temperature": 0.0,
    }
    response = httpx.post(f"{endpoint.base_url}/v1/chat/completions", json=body, timeout=120.0)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def parse_cpu_list(text: str) -> set[int]:
    """``0-1,3`` -> ``{0, 1, 3}`` (the format of taskset and VLLM_CPU_OMP_THREADS_BIND)."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return cpus


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm_server import install_vllm

    from flowprefill_ray.scheduling.slo import SLOConfig
    from loadgen.plan import ttft_targets
    from loadgen.replay_args import replay_config

    if args.cores:
        # Inherited by everything started from here on: Ray's processes and vLLM's.
        os.sched_setaffinity(0, parse_cpu_list(args.cores))
    chosen = systems(args)
    rules = SteadyRules(
        min_steady_s=args.min_steady_s,
        min_requests=args.min_requests,
        warmup_s=args.warmup_s,
        target=args.target,
    )
    slo = SLOConfig(scale=args.slo_scale)
    replay = replay_config(args)
    offsets = trace_offsets_s(replay, slo)
    fractions = [float(f) for f in args.fractions.split(",")]
    install_s = install_vllm() if any(flags for _, flags in chosen) else None
    run_dir = Path(args.run_dir)
    results: dict[str, Any] = {
        name: {"sessions": [], "trials": [], "capacity": []} for name, _ in chosen
    }
    reference_rps = args.capacity_rps
    rates: list[float] = grid_rates(reference_rps, fractions) if reference_rps else []
    for repeat in range(args.repeats):
        for name, flags in chosen:
            print(f"[peer] {name}, session {repeat + 1}/{args.repeats}: starting", flush=True)
            with serving(name, flags, args, slo, run_dir / f"r{repeat}") as (endpoint, info):
                info["greedy_answer"] = greedy_answer(endpoint)
                print(
                    f"[peer] {name}: up in {info['startup_s']:.0f} s; greedy: "
                    f"{info['greedy_answer']!r}",
                    flush=True,
                )
                results[name]["sessions"].append(info)
                if args.capacity_rps is None:
                    capacity = measure_capacity(endpoint, replay, slo, args.capacity_requests)
                    results[name]["capacity"].append(capacity)
                    print(
                        f"[peer] {name}: capacity {capacity['capacity_rps']:.2f} req/s", flush=True
                    )
                    if not rates:  # the reference system's first session sets the grid
                        reference_rps = capacity["capacity_rps"]
                        rates = grid_rates(reference_rps, fractions)
                for rate in rates:
                    trial = steady_trial(
                        endpoint,
                        replay,
                        slo,
                        rate,
                        rules,
                        offsets,
                        run_dir / f"r{repeat}" / name / f"{rate:.3f}rps",
                    )
                    trial["repeat"] = repeat
                    results[name]["trials"].append(trial)
                    print(
                        f"[peer] {name} {rate:.3f} req/s: attainment "
                        f"{trial['attainment']:.3f}, stable {trial['stable']}",
                        flush=True,
                    )
    for r in results.values():
        r.update(grid_goodput(r["trials"], rules.target))
    answers = {n: s["greedy_answer"] for n, r in results.items() for s in r["sessions"]}
    return {
        "smoke": bool(args.smoke),
        "systems": results,
        **goodput_ratios(results),
        "greedy": {
            "question": GREEDY_QUESTION,
            "answers": answers,
            "all_equal": len(set(answers.values())) == 1,
        },
        "cores": sorted(os.sched_getaffinity(0)),
        "reference_capacity_rps": reference_rps,
        "rates_rps": rates,
        "rules": rules.model_dump(),
        "replay": replay.model_dump(),
        "slo_targets_s": ttft_targets(slo),
        "vllm_install_s": install_s,
    }


def goodput_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Ours over the best vLLM configuration of each policy (``None`` when that vLLM held no
    rate of the grid, or a system is missing)."""
    ours = results.get("flowprefill", {}).get("goodput_rps")
    out: dict[str, Any] = {}
    for policy in ("priority", "fcfs"):
        peers = {n: r["goodput_rps"] for n, r in results.items() if n.startswith(f"vllm-{policy}-")}
        best = max(peers.values(), default=0.0)
        out[f"goodput_ratio_vs_vllm_{policy}"] = ours / best if ours is not None and best else None
        out[f"best_vllm_{policy}"] = max(peers, key=peers.get) if peers else None
    return out


def main(argv: list[str] | None = None) -> int:
    from provenance import write_report

    args = parse_args(argv)
    # A plain `kill` must stop the servers like Ctrl-C does: turn SIGTERM into an exception
    # that unwinds through every session's context manager.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    document = run(args)
    document["wall_s"] = time.perf_counter() - started
    write_report(args.out, __file__, argv, "peer_vllm", **document)
    for name, r in document["systems"].items():
        print(
            f"{name:<28} goodput {r['goodput_rps']:.3f} req/s"
            f"{' (censored: top rate passed)' if r['censored'] else ''}"
        )
    for key in ("goodput_ratio_vs_vllm_priority", "goodput_ratio_vs_vllm_fcfs"):
        print(f"{key}: {document[key]}")
    print(f"greedy answers equal: {document['greedy']['all_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
