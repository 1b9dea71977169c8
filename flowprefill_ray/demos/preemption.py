"""Preemption demo: a long prefill is paused at a checkpoint for an urgent short request.

``python -m flowprefill_ray preempt-demo [--tiny]`` runs, in one process on one model:

1. the long prompt alone, straight through (the reference logits);
2. the long prompt again on a background thread, with checkpoints at the chosen granularity.
   Part-way through, the short request "arrives": the main thread asks the long prefill to
   pause, which it does at its next checkpoint; the short request is prefilled and its first
   token sampled; then the long prefill resumes where it stopped and finishes.

It prints a timeline (ms from the long request's start) and the short request's TTFT beside
what it would have been under run-to-completion: the rest of the long prefill plus the short
prefill, both measured in the same run, so a busy machine skews neither. It also checks that
the preempted long prefill produced exactly the logits of the uninterrupted run (nothing was
recomputed or lost on resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowprefill_ray.model import Granularity, LlamaModel, load_model, load_tokenizer
from flowprefill_ray.model.generate import chat_prompt_ids
from flowprefill_ray.model.prefill import LAYER_OPERATORS

SHORT_QUESTION = "What is the capital of France?"
# Varied sentences (written for this demo) so the long prompt looks like a real document.
_DOCUMENT_LINES = [
    "Shipment {i} left the northern warehouse at {h:02d}:{m:02d} carrying {n} crates of parts.",
    "Inspector {i} noted that pallet {n} was damp and asked for it to be dried before storage.",
    "On day {i} the line produced {n} units; {m} were reworked after the torque check failed.",
    "Customer {n} asked whether order {i} could ship by rail instead of road this month.",
]


@dataclass
class PreemptionReport:
    """Timings of one demo run, all in milliseconds; token counts in tokens.

    Moments, since the long prefill started: ``short_arrival_ms``, ``paused_ms``,
    ``short_first_token_ms``, ``resumed_ms``, ``long_done_ms``.
    Durations: ``reference_run_ms`` (the uninterrupted reference run), ``long_executed_ms``
    (the preempted long prefill's own compute, pause excluded), ``blocking_duration_ms``
    (arrival to pause), ``short_prefill_ms``, ``short_ttft_ms`` (arrival to first token),
    ``run_to_completion_ttft_ms`` (the short TTFT had the long prefill not been paused).
    """

    model: str
    granularity: str
    long_tokens: int
    short_tokens: int
    long_checkpoints: int
    reference_run_ms: float
    long_executed_ms: float
    short_arrival_ms: float
    paused_ms: float
    blocking_duration_ms: float
    paused_at_layer: int
    paused_before_operator: str
    short_prefill_ms: float
    short_first_token_ms: float
    short_ttft_ms: float
    short_first_token: str
    resumed_ms: float
    long_done_ms: float
    run_to_completion_ttft_ms: float
    logits_identical: bool
    logits_max_abs_diff: float

    @property
    def short_finished_before_long(self) -> bool:
        return self.short_first_token_ms < self.long_done_ms


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns 0 when the logits check passes, 1 otherwise."""
    args = _parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        workdir = tempfile.TemporaryDirectory(prefix="flowprefill-tiny-")
        from flowprefill_ray.model.checkpoints import tiny_checkpoint

        path = tiny_checkpoint(
            workdir.name, num_layers=4, hidden=256, heads=4, kv_heads=2, intermediate=512
        )
        name = "tiny random Llama (4 layers, hidden 256)"
    else:
        from flowprefill_ray.model.gguf import default_checkpoint

        path = default_checkpoint()
        name = "SmolLM2-135M-Instruct (fp32)"
    print(f"loading {name} from {path}", flush=True)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    long_ids = long_prompt_ids(tokenizer, args.long_tokens)
    short_ids = chat_prompt_ids(tokenizer, SHORT_QUESTION)
    report = run_preemption(
        model,
        long_ids,
        short_ids,
        Granularity(args.granularity),
        args.arrive_at,
        decode=tokenizer.decode,
        model_name=name,
    )
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(report) | {"short_finished_before_long": report.short_finished_before_long}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0 if report.logits_identical else 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flowprefill_ray preempt-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use a generated random-weight tiny model instead of SmolLM2",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=1024,
        help="length of the long prompt in tokens (default 1024)",
    )
    parser.add_argument(
        "--granularity",
        choices=[g.value for g in Granularity],
        default=Granularity.BLOCK.value,
        help="where the long prefill may pause (default: block)",
    )
    parser.add_argument(
        "--arrive-at",
        type=float,
        default=0.3,
        help="when the short request arrives, as the fraction of the long prefill's "
        "checkpoints passed (default 0.3)",
    )
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.long_tokens < 16:
        parser.error("--long-tokens must be at least 16")
    if not 0.0 < args.arrive_at < 1.0:
        parser.error("--arrive-at must be between 0 and 1 (exclusive)")
    return args


def long_prompt_ids(tokenizer, num_tokens: int) -> list[int]:
    """A chat prompt of at most (usually exactly) ``num_tokens`` tokens: a made-up logistics log
    and a question about it."""
    lines, i = [], 0
    while True:
        template = _DOCUMENT_LINES[i % len(_DOCUMENT_LINES)]
        lines.append(template.format(i=i + 1, h=(7 + i) % 24, m=(13 * i) % 60, n=17 * i % 300))
        i += 1
        body = tokenizer.encode(" ".join(lines), add_special_tokens=False)
        if len(body) >= num_tokens:
            break
    question = "\n\nSummarise the log above in two sentences."
    # Trim the document (not the template or the question) until the whole prompt fits;
    # decode/encode round trips can shift the count by a token or two, hence the loop.
    keep = len(body)
    while True:
        ids = chat_prompt_ids(tokenizer, tokenizer.decode(body[:keep]) + question)
        if len(ids) <= num_tokens:
            return ids
        keep -= len(ids) - num_tokens


def run_preemption(
    model: LlamaModel,
    long_ids: list[int],
    short_ids: list[int],
    granularity: Granularity = Granularity.BLOCK,
    arrive_at: float = 0.3,
    decode=str,
    model_name: str = "",
) -> PreemptionReport:
    """Run the phases described in the module docstring and return their timings.

    ``arrive_at`` is the fraction of the long prefill's checkpoints passed before the short
    request arrives; it then arrives half a block later (mid-block, as a real arrival would),
    so the run does not depend on how fast a (possibly busy) machine happens to be.
    """
    model.prefill(short_ids)  # warm-up: one-off costs (thread pools, allocator) go here
    started = time.perf_counter()
    reference = model.start_prefill([long_ids], granularity)
    reference.run(lambda: False)
    reference_run_s = time.perf_counter() - started
    reference_logits = reference.result().last_logits

    long_state = model.start_prefill([long_ids], granularity)
    arrival_checkpoint = max(
        1, min(long_state.num_checkpoints - 1, round(arrive_at * long_state.num_checkpoints))
    )
    pause_requested = threading.Event()
    resume = threading.Event()
    paused = threading.Event()
    marks: dict[str, float] = {}

    reached_arrival = threading.Event()

    def should_pause() -> bool:
        if long_state.checkpoints_passed >= arrival_checkpoint:
            reached_arrival.set()
        if pause_requested.is_set():
            marks["paused"] = time.perf_counter()
            marks["executed_at_pause_s"] = long_state.executed_s
            return True
        return False

    def run_long() -> None:
        marks["long_start"] = time.perf_counter()
        while not long_state.run(should_pause):
            paused.set()
            resume.wait()
            marks["resumed"] = time.perf_counter()
        marks["long_done"] = time.perf_counter()
        reached_arrival.set()  # never leave the main thread waiting if no pause happened
        paused.set()

    worker = threading.Thread(target=run_long, name="long-prefill", daemon=True)
    worker.start()
    reached_arrival.wait()
    elapsed = time.perf_counter() - marks["long_start"]
    time.sleep(0.5 * elapsed / max(long_state.checkpoints_passed, 1))
    marks["arrival"] = time.perf_counter()
    pause_requested.set()
    paused.wait()
    if "paused" not in marks:
        raise RuntimeError(
            "the long prefill finished before the short request arrived; use a longer "
            "--long-tokens or an earlier --arrive-at"
        )
    cursor, next_op = long_state.cursor, long_state.next_operator

    first_token = _prefill_and_pick(model, short_ids)
    marks["short_first_token"] = time.perf_counter()
    pause_requested.clear()
    resume.set()
    worker.join()

    logits = long_state.result().last_logits

    def at(key: str) -> float:
        return (marks[key] - marks["long_start"]) * 1000.0

    arrival_ms, paused_ms = at("arrival"), at("paused")
    short_prefill_ms = at("short_first_token") - paused_ms
    long_executed_ms = long_state.executed_s * 1000.0
    remaining_after_pause_ms = long_executed_ms - marks["executed_at_pause_s"] * 1000.0
    return PreemptionReport(
        model=model_name,
        granularity=granularity.value,
        long_tokens=len(long_ids),
        short_tokens=len(short_ids),
        long_checkpoints=long_state.num_checkpoints,
        reference_run_ms=reference_run_s * 1000.0,
        long_executed_ms=long_executed_ms,
        short_arrival_ms=arrival_ms,
        paused_ms=paused_ms,
        blocking_duration_ms=paused_ms - arrival_ms,
        paused_at_layer=cursor.layer,
        paused_before_operator=_operator_name(cursor, next_op),
        short_prefill_ms=short_prefill_ms,
        short_first_token_ms=at("short_first_token"),
        short_ttft_ms=at("short_first_token") - arrival_ms,
        short_first_token=decode([first_token]),
        resumed_ms=at("resumed"),
        long_done_ms=at("long_done"),
        # Without preemption the short request would wait for the whole rest of the long
        # prefill (the part it was blocked plus what remained at the pause), then run.
        run_to_completion_ttft_ms=(paused_ms - arrival_ms)
        + remaining_after_pause_ms
        + short_prefill_ms,
        logits_identical=bool(torch.equal(logits, reference_logits)),
        logits_max_abs_diff=float((logits - reference_logits).abs().max()),
    )


def _prefill_and_pick(model: LlamaModel, token_ids: list[int]) -> int:
    """Prefill and take the greedy first token: what a client waits for (TTFT)."""
    state = model.start_prefill([token_ids])
    state.run(lambda: False)
    return int(state.result().last_logits[0].argmax())


def _operator_name(cursor, next_op: str | None) -> str:
    if next_op is None:
        return "done"
    if next_op in LAYER_OPERATORS:
        return f"layer {cursor.layer} {next_op}"
    return next_op


def print_report(r: PreemptionReport) -> None:
    """Print the timeline and the two checks in a compact, readable form."""
    print(f"\nFlowPrefill preemption demo: {r.model}, granularity={r.granularity}")
    print(
        f"long prompt {r.long_tokens} tokens ({r.long_checkpoints} checkpoints), "
        f"short prompt {r.short_tokens} tokens\n"
    )
    rows = [
        (0.0, f"long prefill starts ({r.long_tokens} tokens)"),
        (r.short_arrival_ms, "short request arrives; pause requested"),
        (
            r.paused_ms,
            f"long paused before {r.paused_before_operator} "
            f"(blocked the short request {r.blocking_duration_ms:.1f} ms)",
        ),
        (
            r.short_first_token_ms,
            f"short request's first token {r.short_first_token!r} (TTFT {r.short_ttft_ms:.1f} ms)",
        ),
        (r.resumed_ms, "long prefill resumes where it paused"),
        (
            r.long_done_ms,
            f"long prefill done (its own compute {r.long_executed_ms:.1f} ms, pause excluded)",
        ),
    ]
    print(f"{'t (ms)':>9}  event")
    for t, text in rows:
        print(f"{t:9.1f}  {text}")
    speedup = r.run_to_completion_ttft_ms / r.short_ttft_ms if r.short_ttft_ms > 0 else float("inf")
    print(
        f"\nshort TTFT: {r.short_ttft_ms:.1f} ms with preemption; "
        f"~{r.run_to_completion_ttft_ms:.1f} ms under run-to-completion ({speedup:.1f}x)"
    )
    verdict = "PASS" if r.logits_identical else "FAIL"
    print(
        f"long request logits identical to an uninterrupted run: {verdict} "
        f"(max |diff| {r.logits_max_abs_diff:.3g})"
    )


if __name__ == "__main__":
    sys.exit(main())
