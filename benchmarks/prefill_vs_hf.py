"""Our model's prefill against Hugging Face transformers' on the same weights, threads and prompts.

    .venv/bin/python benchmarks/prefill_vs_hf.py --out docs/results/prefill_vs_hf.json

Why: on CPU the whole request rate a deployment sustains is the prefill worker's speed. This
times, in one process, one after the other for each prompt length (``--tokens``), ``--repeats``
times each (median reported, after one warm-up):

- ``ours``: ``LlamaModel.prefill`` (the operator program the prefill worker runs, with its
  checkpoints, torch kernels) on the deployment's model (SmolLM2-135M-Instruct, fp32), its
  matmuls through oneDNN on packed weights (``cpu_matmul="onednn"``, cpu_matmul.py);
- ``ours, torch matmul``: the same with ``cpu_matmul="torch"`` (``F.linear``, MKL's sgemm;
  the default);
- ``hf``: ``transformers``' ``LlamaForCausalLM`` forward (SDPA attention) on the very same
  safetensors directory, under ``torch.inference_mode``, logits of the last position only.

Both on ``--threads`` torch threads (the shipped prefill worker uses 1).

With ``--servers`` it then also times one request at a time (``max_tokens`` 1, a fresh prompt
each time so no prefix cache answers it, median of ``--repeats``) through HTTP, first to our
shipped deployment (``LocalServe``, as ``peer_vllm.py`` starts it), then to vLLM on CPU
(``VllmServer``, its default flags there: one OpenMP thread bound to a core, the other core
reserved): the lone-request TTFT each server reaches on the cores of ``--cores``, which bounds
the request rate each can sustain. Prints a table and writes JSON with the command, commit
and machine (provenance.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/prefill_vs_hf.json")
    p.add_argument("--tokens", default="16,128,384", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--servers", action="store_true", help="also time lone requests over HTTP")
    p.add_argument(
        "--our-cpu-matmul",
        choices=("torch", "onednn"),
        default=None,
        help="our deployment's model.cpu_matmul under --servers (default: the shipped one)",
    )
    p.add_argument("--cores", default=None, help="CPU ids for everything, e.g. 0-1 (default: all)")
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


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """One row per prompt length; also the model's vocabulary size (prompts are drawn from
    it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flowprefill_ray.model.gguf import default_checkpoint
    from flowprefill_ray.model.llama import load_model

    torch.set_num_threads(args.threads)
    path = default_checkpoint()
    ours = load_model(path, kernels="torch", cpu_matmul="onednn")
    ours_dense = load_model(path, kernels="torch", cpu_matmul="torch")
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    vocab = ours.config.vocab_size
    rows = []
    for tokens in args.tokens:
        ids = prompt_ids(tokens, vocab)
        batch = torch.tensor([ids])

        def hf_prefill(batch=batch):
            with torch.inference_mode():
                hf(batch, use_cache=True, logits_to_keep=1)

        ours_s = _median_s(lambda ids=ids: ours.prefill(ids), args.repeats)
        dense_s = _median_s(lambda ids=ids: ours_dense.prefill(ids), args.repeats)
        hf_s = _median_s(hf_prefill, args.repeats)
        row = {
            "tokens": tokens,
            "ours_s": ours_s,
            "ours_torch_matmul_s": dense_s,
            "hf_s": hf_s,
            "ours_over_hf": ours_s / hf_s,
            "torch_matmul_over_hf": dense_s / hf_s,
        }
        rows.append(row)
        print(
            f"| {tokens} | {ours_s * 1000:.1f} | {dense_s * 1000:.1f} | {hf_s * 1000:.1f} "
            f"| {ours_s / hf_s:.2f} | {dense_s / hf_s:.2f} |",
            flush=True,
        )
    return rows, vocab


def prompt_ids(tokens: int, vocab: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of ``tokens`` ids. Every id depends on ``salt``: prompts of two
    salts share no prefix, while two lengths of one salt do (one is the other's prefix)."""
    return [(i * 7919 + salt * 104729) % (vocab - 10) + 5 for i in range(tokens)]


def lone_request_s(
    url: str, body: dict[str, Any], tokens: int, repeats: int, vocab: int, salts: Iterator[int]
) -> float:
    """Median seconds of one ``max_tokens`` 1 completion of a ``tokens``-long prompt, sent only
    when the previous one has answered (one warm-up first). ``salts`` must never repeat over a
    server's life: a prompt of a used salt would find its prefix cached (vLLM caches by
    default), and the shorter prompts of that salt are prefixes of the longer ones."""
    import httpx

    with httpx.Client(timeout=600.0) as client:

        def once() -> None:
            prompt = prompt_ids(tokens, vocab, next(salts))
            reply = client.post(f"{url}/v1/completions", json={**body, "prompt": prompt})
            reply.raise_for_status()

        return _median_s(once, repeats)


def run_servers(args: argparse.Namespace, rows: list[dict[str, Any]], vocab: int) -> dict[str, Any]:
    """Adds ``ours_server_s`` and ``vllm_server_s`` to each row (prompts of ``vocab`` ids);
    returns what to record about the two servers."""
    from our_server import our_app_args
    from vllm_server import VllmFlags, VllmServer, install_vllm

    from flowprefill_ray.demos.local_serve import LocalServe, free_port, served_model_name
    from flowprefill_ray.model.gguf import default_checkpoint

    deploy = our_app_args(4.0)
    if args.our_cpu_matmul:
        deploy["runtime"]["model"]["cpu_matmul"] = args.our_cpu_matmul
    model = served_model_name(deploy)
    body = {"model": model, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    salts = itertools.count(1)

    def time_each_row(key: str, url: str, request: dict[str, Any]) -> None:
        # One salt sequence across both servers: no prompt repeats, so no cache can serve it.
        for row in rows:
            row[key] = lone_request_s(url, request, row["tokens"], args.repeats, vocab, salts)

    with LocalServe(deploy) as live:
        # A TTFT target no prompt here can miss, so admission never refuses one.
        time_each_row("ours_server_s", live.url, {**body, "ttft_slo_ms": 3_600_000})
    install_vllm()
    flags = VllmFlags()
    log = Path("results") / "prefill_vs_hf_vllm.log"
    with VllmServer(default_checkpoint(), model, free_port(), flags, log) as server:
        time_each_row("vllm_server_s", server.url, body)
        binding = server.thread_binding()
    for row in rows:
        row["ours_over_vllm_server"] = row["ours_server_s"] / row["vllm_server_s"]
        print(
            f"| {row['tokens']} | ours server {row['ours_server_s'] * 1000:.1f} ms | vLLM server "
            f"{row['vllm_server_s'] * 1000:.1f} ms | {row['ours_over_vllm_server']:.2f} |",
            flush=True,
        )
    return {
        "our_torch_threads": deploy["runtime"]["prefill"]["torch_threads"],
        "our_cpu_matmul": deploy["runtime"]["model"]["cpu_matmul"],
        "vllm_flags": flags.model_dump(),
        "vllm_thread_binding": binding,
    }


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: provenance records the load average when it is imported.
    from provenance import write_report

    args = parse_args(argv)
    from peer_vllm import pin_to_cores

    pin_to_cores(args.cores)
    print("| prompt tokens | ours ms | ours, torch matmul ms | transformers ms "
          "| ours / transformers | torch matmul / transformers |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rows, vocab = run(args)
    servers = run_servers(args, rows, vocab) if args.servers else None
    write_report(
        args.out,
        __file__,
        argv,
        "prefill_vs_hf",
        threads=args.threads,
        repeats=args.repeats,
        model="SmolLM2-135M-Instruct fp32 (the embedded default)",
        rows=rows,
        servers=servers,
        cores=sorted(os.sched_getaffinity(0)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
