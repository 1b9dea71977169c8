"""How fast is batched decode over the paged KV cache?

For each context length and batch size: B sequences, each holding `context` tokens of KV in a
`PagedKVCache` (one real prefill, its KV added B times), then `--steps` batched decode steps.
Reported: ms per step and generated tokens/s (B tokens per step). Beside it, transformers'
own one-sequence decode (its KV cache, one token per forward) at the same context, as the
baseline for batch 1.

    .venv/bin/python benchmarks/decode_throughput.py --model tiny --out results/decode_throughput.json
    .venv/bin/python benchmarks/decode_throughput.py --model smollm2 --contexts 128,1024 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from model_bench import BENCH_MODEL_SHAPE, random_prompt, sync  # noqa: E402
from provenance import command_line  # noqa: E402

from flowprefill_ray.model import LlamaModel, PagedKVCache, load_model  # noqa: E402


def time_ours(model: LlamaModel, context: int, batch: int, steps: int, block_size: int) -> float:
    """Median seconds per batched decode step with `batch` sequences at `context` tokens."""
    kv = model.prefill(random_prompt(context, model.config.vocab_size)).kv[0]
    blocks_per_seq = -(-(context + steps + 2) // block_size)
    cache = PagedKVCache(
        model.config, batch * blocks_per_seq, block_size, device=model.device, dtype=model.dtype
    )
    seq_ids = list(range(batch))
    for seq_id in seq_ids:
        cache.add(seq_id, kv)
    tokens = [5] * batch
    model.decode_step(seq_ids, tokens, cache)  # warm-up
    times = []
    for _ in range(steps):
        sync(model.device)
        started = time.perf_counter()
        logits = model.decode_step(seq_ids, tokens, cache)
        tokens = logits.argmax(-1).tolist()
        sync(model.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_transformers(hf_model, context: int, steps: int, vocab: int, device) -> float:
    """Median seconds per one-token forward of transformers with its own KV cache."""
    ids = torch.tensor([random_prompt(context, vocab)], device=device)
    with torch.no_grad():
        out = hf_model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps + 1):
            sync(device)
            started = time.perf_counter()
            out = hf_model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--contexts", default="128,1024", help="context lengths, tokens")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes (sequences)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per point")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size, tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default="results/decode_throughput.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    workdir = tempfile.TemporaryDirectory(prefix="decode-bench-")
    if args.model == "tiny":
        from flowprefill_ray.model.checkpoints import tiny_checkpoint

        path = tiny_checkpoint(workdir.name, max_position=max(contexts) + 64, **BENCH_MODEL_SHAPE)
    else:
        from flowprefill_ray.model.checkpoints import default_checkpoint

        path = default_checkpoint()
    device = torch.device(args.device)
    model = load_model(path, device=device, kernels=args.kernels)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()

    rows = []
    print(
        f"model={args.model} device={device} kernels={model.ops.backend.value} "
        f"threads={torch.get_num_threads()} block_size={args.block_size}"
    )
    print(f"{'context':>8} {'batch':>6} {'ms/step':>9} {'tokens/s':>10} {'HF b=1 ms':>10}")
    for context in contexts:
        hf_s = time_transformers(hf_model, context, args.steps, model.config.vocab_size, device)
        for batch in batches:
            step_s = time_ours(model, context, batch, args.steps, args.block_size)
            row = {
                "context_tokens": context,
                "batch": batch,
                "step_ms": step_s * 1000.0,
                "tokens_per_s": batch / step_s,
                "transformers_batch1_step_ms": hf_s * 1000.0,
            }
            rows.append(row)
            print(
                f"{context:8d} {batch:6d} {row['step_ms']:9.2f} {row['tokens_per_s']:10.1f} "
                f"{row['transformers_batch1_step_ms']:10.2f}"
            )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command_line(__file__, argv),
                "model": args.model,
                "device": str(device),
                "kernels": model.ops.backend.value,
                "threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
