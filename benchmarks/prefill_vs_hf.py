"""Our model's prefill against Hugging Face transformers' on the same weights, threads and prompts.

    .venv/bin/python benchmarks/prefill_vs_hf.py --out docs/results/prefill_vs_hf.json

Why: on CPU the whole request rate a deployment sustains is the prefill worker's speed. This
times, in one process, one after the other for each prompt length (``--tokens``), ``--repeats``
times each (median reported, after one warm-up):

- ``ours``: ``LlamaModel.prefill`` (the operator program the prefill worker runs, with its
  checkpoints, torch kernels) on the deployment's model (SmolLM2-135M-Instruct, fp32);
- ``hf``: ``transformers``' ``LlamaForCausalLM`` forward (SDPA attention) on the very same
  safetensors directory, under ``torch.inference_mode``, logits of the last position only.

Both on ``--threads`` torch threads (the shipped prefill worker uses 1). Prints a table and
writes JSON with the command, commit and machine (provenance.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/prefill_vs_hf.json")
    p.add_argument("--tokens", default="16,128,384", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error("--tokens must be comma-separated integers")
    if min(args.tokens) < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--tokens, --repeats and --threads must be positive")
    return args


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    from flowprefill_ray.model.gguf import default_checkpoint
    from flowprefill_ray.model.llama import load_model

    torch.set_num_threads(args.threads)
    path = default_checkpoint()
    ours = load_model(path, kernels="torch")
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    vocab = ours.config.vocab_size
    rows = []
    for tokens in args.tokens:
        ids = [(i * 7919) % (vocab - 10) + 5 for i in range(tokens)]
        batch = torch.tensor([ids])

        def hf_prefill(batch=batch):
            with torch.inference_mode():
                hf(batch, use_cache=True, logits_to_keep=1)

        ours_s = _median_s(lambda ids=ids: ours.prefill(ids), args.repeats)
        hf_s = _median_s(hf_prefill, args.repeats)
        row = {"tokens": tokens, "ours_s": ours_s, "hf_s": hf_s, "ours_over_hf": ours_s / hf_s}
        rows.append(row)
        print(
            f"| {tokens} | {ours_s * 1000:.1f} | {hf_s * 1000:.1f} | {ours_s / hf_s:.2f} |",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: provenance records the load average when it is imported.
    from provenance import write_report

    args = parse_args(argv)
    print("| prompt tokens | ours ms | transformers ms | ours / transformers |")
    print("|---|---|---|---|")
    rows = run(args)
    write_report(
        args.out,
        __file__,
        argv,
        "prefill_vs_hf",
        threads=args.threads,
        repeats=args.repeats,
        model="SmolLM2-135M-Instruct fp32 (the embedded default)",
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
