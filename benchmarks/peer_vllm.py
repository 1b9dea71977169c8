"""Our shipped deployment against vLLM on CPU, same model, same cores, same requests (issue 14, §4).

    .venv/bin/python benchmarks/peer_vllm.py --out docs/results/peer_vllm_cpu.json   # hours
    .venv/bin/python benchmarks/peer_vllm.py --smoke --out /tmp/peer_vllm_smoke.json  # minutes
    bash run.sh bench-peer [ARGS]                                                  # the same

Systems (``--systems``):

- ``flowprefill``: ``deployments/local.yaml``'s Serve app (SmolLM2 fp32 on CPU, the shipped
  policy and admission control), its SLO classes at ``--slo-scale``;
- ``flowprefill-prefix``: the same with the prefix cache on (``our_server.py``; blocks of
  ``--prefix-block-tokens``), to measure what the cache is worth on a trace that repeats
  prefixes (``--trace 'multiturn[...]'``, issue 18);
- ``flowprefill-giveup`` (and ``flowprefill-prefix-giveup``): the same apps with
  ``policy.late_give_up_factor`` at ``--late-give-up-factor`` (issue 21): a request that far
  past its deadline is refused instead of waiting on;
- ``flowprefill+NAME`` (and ``flowprefill-giveup+NAME`` ...): one of the above with the policy
  fields of ``--our-variant NAME=JSON`` merged over the shipped ones, so that an ablation and
  the shipped config alternate in one run;
- ``vllm-priority`` / ``vllm-fcfs``: ``vllm-cpu`` 0.32 (``benchmarks/vllm_server.py``, its own
  venv) serving the very safetensors directory our deployment converts from the embedded GGUF,
  once per ``--max-num-batched-tokens`` value. Under ``priority`` every request carries its
  class's ``priority`` (tightest TTFT target 0; lower is served first).

Both run on the cores of ``--cores`` (this process's CPU affinity, inherited by Ray and by
vLLM). Each system's session: start it, ask one greedy chat question (every system must give
the same answer), then run the grid of steady trials (``peer_steady.py``: >= 180 s and >= 300
requests after a 30 s warm-up, unstable when the backlog does not drain within 2x the loosest
SLO); ``--repeats`` sessions per system. The grid is ``--fractions`` of the capacity of the
``--reference`` system (default: vLLM fcfs, a work-conserving server without admission
control), measured as its throughput on a burst of the trace's requests at the start of each
of its sessions; its sessions run first. Requests are the trace's: at one rate the same
requests for every system (``loadgen``, open loop, token-id prompts, ``ignore_eos``, outputs
capped). The JSON has each system's goodput (the highest grid rate that
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flowprefill_ray.process_env import apply_defaults

sys.path.insert(0, str(Path(__file__).resolve().parent))
apply_defaults()  # before Ray starts: loopback, the front end at nice 0, no hub

from cli_json import json_object, parse_variants  # noqa: E402
from our_server import OurFlags, counts_over, our_app_args, scheduler_counts  # noqa: E402
from peer_steady import (  # noqa: E402
    SteadyRules,
    grid_rates,
    measure_capacity,
    steady_trial,
    trace_offsets_s,
)
from vllm_server import VllmFlags  # noqa: E402

from loadgen.steady_goodput import grid_goodput  # noqa: E402

Flags = OurFlags | VllmFlags

GREEDY_QUESTION = "What is the capital of France?"
# --smoke: the whole path once, quickly: no figure from it means anything.
SMOKE = dict(
    repeats=1,
    fractions="0.3",
    min_steady_s=45.0,
    min_requests=0,
    warmup_s=10.0,
    capacity_requests=12,
    max_num_batched_tokens="512",
    aiperf_requests=8,
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
    p.add_argument("--fractions", default="0.2,0.4,0.6,0.8,1.0", help="rates, x capacity")
    p.add_argument(
        "--reference",
        default="vllm-fcfs",
        help="the system (or the first whose name starts so) whose capacity sets the grid; "
        "its sessions run first. A server that refuses work it cannot serve in time "
        "(ours, with admission control) would understate the machine's capacity",
    )
    p.add_argument("--capacity-rps", type=float, default=None, help="skip measuring; use this")
    p.add_argument("--capacity-requests", type=int, default=60, help="burst size (requests)")
    p.add_argument("--min-steady-s", type=float, default=180.0)
    p.add_argument("--min-requests", type=int, default=300)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--target", type=float, default=0.9, help="TTFT attainment to hold (0..1)")
    p.add_argument(
        "--aiperf",
        action="store_true",
        help="also drive each system once with NVIDIA aiperf at the lowest grid rate (a "
        "second client as a cross-check; installs it into its own venv)",
    )
    p.add_argument("--aiperf-requests", type=int, default=100)
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
    p.add_argument(
        "--prefix-block-tokens", type=int, default=64, help="flowprefill-prefix: cache block"
    )
    p.add_argument(
        "--late-give-up-factor",
        type=float,
        default=1.0,
        help="flowprefill-*giveup: policy.late_give_up_factor (x the TTFT target past the "
        "deadline)",
    )
    p.add_argument(
        "--our-policy-json",
        default="{}",
        help="fields merged into our systems' shipped policy config (an ablation), e.g. "
        "'{\"late_grace\": true}'",
    )
    p.add_argument(
        "--our-variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="adds systems flowprefill+NAME (and each of our other systems +NAME): the same "
        "app with these policy fields merged over --our-policy-json's, to run an ablation "
        "side by side with the shipped config in one run; repeatable",
    )
    p.add_argument("--run-dir", default="results/peer_vllm", help="trials' records, server logs")
    p.add_argument("--out", default="results/peer_vllm_cpu.json")
    args = p.parse_args(argv)
    try:
        args.our_policy = json_object(args.our_policy_json, "--our-policy-json")
    except ValueError as error:
        p.error(str(error))
    args.our_variants = parse_variants(args.our_variant)
    if args.smoke and "docs/results" in Path(args.out).resolve().as_posix():
        p.error("--smoke measures nothing worth keeping: give an --out outside docs/results")
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def systems(args: argparse.Namespace) -> list[tuple[str, Flags]]:
    """``(name, its flags)`` per system, in the order they run: the ``--reference`` system
    first, the others in ``--systems`` order."""
    budgets = [int(b) for b in args.max_num_batched_tokens.split(",") if b.strip()]
    # Our systems by the names OurFlags gives them: every combination of the settings.
    variants = {None: {}, **args.our_variants}
    ours = {
        flags.name: flags
        for flags in (
            OurFlags(
                prefix_cache=cache,
                prefix_block_tokens=args.prefix_block_tokens,
                late_give_up_factor=give_up,
                policy={**args.our_policy, **fields},
                variant=variant,
            )
            for cache in (False, True)
            for give_up in (None, args.late_give_up_factor)
            for variant, fields in variants.items()
        )
    }
    chosen: list[tuple[str, Flags]] = []
    for name in (s.strip() for s in args.systems.split(",") if s.strip()):
        if name in ours:
            chosen.append((name, ours[name]))
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
            raise ValueError(
                f"unknown system {name!r}: {', '.join(ours)}, vllm-priority, vllm-fcfs"
            )
    reference = next(
        (i for i, (name, _) in enumerate(chosen) if name.startswith(args.reference)), None
    )
    if reference is None:
        raise ValueError(f"--reference {args.reference!r} is none of {[n for n, _ in chosen]}")
    return [chosen[reference], *chosen[:reference], *chosen[reference + 1 :]]


def request_priorities(flags: Flags, slo: Any) -> dict[str, int] | None:
    """The ``priority`` per SLO class a system gets: by TTFT target under vLLM's priority
    policy; none for fcfs (vLLM refuses a non-zero priority there) nor for ours (it reads
    ``slo_class``)."""
    from loadgen.config import priority_by_target
    from loadgen.plan import ttft_targets

    if not isinstance(flags, VllmFlags) or flags.scheduling_policy != "priority":
        return None
    return priority_by_target(ttft_targets(slo))


def stop_cleanly_on_signals() -> None:
    """A plain ``kill`` must stop the servers as Ctrl-C does: SIGTERM raises an exception that
    unwinds through every session's context manager. Called again before every session:
    ``ray.shutdown()`` at the end of our system's session puts the default handlers back (a
    SIGTERM then killed this process at once and left the next vLLM server running)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def serving(
    name: str, flags: Flags, args: argparse.Namespace, slo: Any, log_dir: Path
) -> Iterator[tuple[Any, dict[str, Any], Callable[[], dict[str, int]] | None]]:
    """One session of a system: yields its endpoint, what to record about it and, for ours,
    a reading of its scheduler's counters; stops it (and every process it started) on
    leaving, also on an error or Ctrl-C."""
    from vllm_server import VllmServer

    from flowprefill_ray.demos.local_serve import LocalServe, free_port, served_model_name
    from flowprefill_ray.model.checkpoints import default_checkpoint
    from loadgen import EndpointConfig

    deploy = our_app_args(args.slo_scale, flags if isinstance(flags, OurFlags) else OurFlags())
    model = served_model_name(deploy)
    started = time.perf_counter()
    if isinstance(flags, OurFlags):
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
                "prefix_cache": runtime["prefill"]["prefix_cache"],
                # Nice value of Serve's proxy and our replicas (Ray's default: 15).
                "front_end_niceness": os.environ.get("RAY_worker_niceness"),
            }
            endpoint = EndpointConfig(base_url=live.url, model=model, ignore_eos=True)
            yield endpoint, info, lambda: scheduler_counts(deploy)
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
        yield endpoint, info, None


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


def pin_to_cores(cores: str | None) -> None:
    """Run this process on the CPUs of ``cores`` (``parse_cpu_list``'s format; None: leave
    it), inherited by everything started from here on: Ray's processes and vLLM's."""
    if cores:
        os.sched_setaffinity(0, parse_cpu_list(cores))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm_server import install_vllm

    from flowprefill_ray.scheduling.slo import SLOConfig
    from loadgen.plan import ttft_targets
    from loadgen.replay_args import replay_config

    pin_to_cores(args.cores)
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
    install_s = install_vllm() if any(isinstance(f, VllmFlags) for _, f in chosen) else None
    run_dir = Path(args.run_dir)
    results: dict[str, Any] = {
        name: {"sessions": [], "trials": [], "capacity": []} for name, _ in chosen
    }
    reference_rps = args.capacity_rps
    rates: list[float] = grid_rates(reference_rps, fractions) if reference_rps else []
    for repeat in range(args.repeats):
        for name, flags in chosen:
            print(f"[peer] {name}, session {repeat + 1}/{args.repeats}: starting", flush=True)
            stop_cleanly_on_signals()
            session = serving(name, flags, args, slo, run_dir / f"r{repeat}")
            with session as (endpoint, info, counts):
                info["greedy_answer"] = greedy_answer(endpoint)
                print(f"[peer] {name}: up in {info['startup_s']:.0f} s; greedy: "
                      f"{info['greedy_answer']!r}", flush=True)  # fmt: skip
                results[name]["sessions"].append(info)
                if args.capacity_rps is None and name == chosen[0][0]:
                    capacity = measure_capacity(endpoint, replay, slo, args.capacity_requests)
                    results[name]["capacity"].append(capacity)
                    print(f"[peer] capacity {capacity['capacity_rps']:.2f} req/s", flush=True)
                    if not rates:  # the reference's first session sets the grid
                        reference_rps = capacity["capacity_rps"]
                        rates = grid_rates(reference_rps, fractions)
                for rate in rates:
                    out = run_dir / f"r{repeat}" / name / f"{rate:.3f}rps"
                    before = counts() if counts else None
                    trial = steady_trial(endpoint, replay, slo, rate, rules, offsets, out)
                    trial["repeat"] = repeat
                    if counts and before is not None:
                        # Over the whole trial, warm-up included (the scheduler counts all).
                        trial["server_counts"] = counts_over(before, counts())
                    results[name]["trials"].append(trial)
                    print(f"[peer] {name} {rate:.3f} req/s: attainment "
                          f"{trial['attainment']:.3f}, stable {trial['stable']}", flush=True)  # fmt: skip
                if args.aiperf and repeat == 0 and results[name]["trials"]:
                    results[name]["aiperf"] = aiperf_cross_check(
                        endpoint, args, results[name]["trials"][0], run_dir / "aiperf" / name
                    )
    for r in results.values():
        r.update(grid_goodput(r["trials"], rules.target))
    answers = {n: [s["greedy_answer"] for s in r["sessions"]] for n, r in results.items()}
    return {
        "smoke": bool(args.smoke),
        "systems": results,
        **goodput_ratios(results),
        "greedy": {
            "question": GREEDY_QUESTION,
            "answers": answers,
            "all_equal": len({a for each in answers.values() for a in each}) == 1,
        },
        "cores": sorted(os.sched_getaffinity(0)),
        "reference": chosen[0][0],
        "reference_capacity_rps": reference_rps,
        "rates_rps": rates,
        "rules": rules.model_dump(),
        "replay": replay.model_dump(),
        "slo_targets_s": ttft_targets(slo),
        "vllm_install_s": install_s,
    }


def aiperf_cross_check(endpoint: Any, args: argparse.Namespace, trial: dict, out: Path) -> dict:
    """aiperf at ``trial``'s rate, prompts of its mean length, beside our client's TTFT."""
    from peer_aiperf import cross_check, run_aiperf

    from flowprefill_ray.model.checkpoints import default_checkpoint

    extra: dict[str, Any] = {"ignore_eos": True}
    measured = run_aiperf(
        endpoint.base_url,
        endpoint.model,
        trial["rate_rps"],
        max(1, round(trial["prompt_tokens_mean"])),
        args.max_output_tokens,
        args.aiperf_requests,
        extra,
        default_checkpoint(),
        out,
    )
    print(f"[peer] aiperf: TTFT ms {measured['ttft_ms']} error {measured['error']}", flush=True)
    return cross_check(measured, trial)


def goodput_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Ours over the best vLLM configuration of each policy, and ours with the prefix cache
    over ours without (``None`` when the denominator held no rate of the grid, or a system is
    missing)."""
    ours = results.get("flowprefill", {}).get("goodput_rps")
    cached = results.get("flowprefill-prefix", {}).get("goodput_rps")
    out: dict[str, Any] = {
        "goodput_ratio_prefix_cache": cached / ours if cached is not None and ours else None
    }
    for policy in ("priority", "fcfs"):
        peers = {n: r["goodput_rps"] for n, r in results.items() if n.startswith(f"vllm-{policy}-")}
        best = max(peers.values(), default=0.0)
        out[f"goodput_ratio_vs_vllm_{policy}"] = ours / best if ours is not None and best else None
        out[f"best_vllm_{policy}"] = max(peers, key=peers.get) if peers else None
    return out


def main(argv: list[str] | None = None) -> int:
    from provenance import write_report

    args = parse_args(argv)
    stop_cleanly_on_signals()
    started = time.perf_counter()
    document = run(args)
    document["wall_s"] = time.perf_counter() - started
    write_report(args.out, __file__, argv, "peer_vllm", **document)
    for name, r in document["systems"].items():
        print(
            f"{name:<28} goodput {r['goodput_rps']:.3f} req/s"
            f"{' (censored: top rate passed)' if r['censored'] else ''}"
        )
    for key in (
        "goodput_ratio_vs_vllm_priority",
        "goodput_ratio_vs_vllm_fcfs",
        "goodput_ratio_prefix_cache",
    ):
        print(f"{key}: {document[key]}")
    print(f"greedy answers equal: {document['greedy']['all_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
