"""Pause latency for gpu_check: how soon a paused prefill leaves the GPU free, per mode.

Loads a random-weight model (``flowprefill_ray.model.checkpoints``) and, for each checkpoint
granularity and each ``checkpoint_sync`` mode ("sync": stream sync at every checkpoint;
"bounded": CUDA events, bounded run-ahead), measures the uninterrupted prefill time and the
delay from a pause request until the paused prefill has drained the stream. This is the trade
docs/GPU.md describes: fewer syncs against a longer pause.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PauseModel:
    """Size of the random model and prompt used for pause latency."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    prompt_tokens: int
    timed_runs: int  # uninterrupted prefills timed (after one warm-up)
    trials: int  # prefills paused once each
    dtype: torch.dtype


GPU_PAUSE_MODEL = PauseModel(8, 2048, 16, 4, 8192, 8192, 3, 12, torch.bfloat16)
DRY_PAUSE_MODEL = PauseModel(2, 64, 4, 2, 128, 32, 1, 1, torch.float32)


def measure_pause_latency(
    spec: PauseModel, device: torch.device, kernels: str
) -> tuple[list[dict], str | None]:
    """Rows per (granularity, checkpoint_sync), or ([], reason) when the model is missing.

    A pause is requested at a set fraction of an uninterrupted prefill's time; latency is
    from that moment until ``run`` returns, and ``run`` returns only after draining the
    stream, so it is the time until the GPU is free for other work.
    """
    try:
        import inspect

        from flowprefill_ray.model import Granularity, load_model
        from flowprefill_ray.model.checkpoints import tiny_checkpoint
    except ImportError as exc:
        return [], f"flowprefill_ray.model is not importable: {exc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_checkpoint(
            Path(tmp) / "pause_model",
            num_layers=spec.layers,
            hidden=spec.hidden,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate=spec.intermediate,
            vocab=512,
            max_position=max(4096, 2 * spec.prompt_tokens),
        )
        model = load_model(path, device=device, dtype=spec.dtype, kernels=kernels)
    if "checkpoint_sync" not in inspect.signature(model.start_prefill).parameters:
        return [], "this model version has no checkpoint_sync option"
    tokens = [(i * 37) % 500 + 3 for i in range(spec.prompt_tokens)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for granularity in Granularity:
        for mode in ("sync", "bounded"):

            def start(granularity=granularity, mode=mode):
                return model.start_prefill([tokens], granularity=granularity, checkpoint_sync=mode)

            full = []
            for i in range(1 + spec.timed_runs):  # the first run warms up (compiles kernels)
                sync()
                began = time.perf_counter()
                state = start()
                state.run(lambda: False)
                sync()
                if i:
                    full.append(time.perf_counter() - began)
                    expected = state.result().last_logits
            full_s = statistics.median(full)
            latencies, max_diff = [], 0.0
            for trial in range(spec.trials):
                fraction = 0.1 + 0.8 * (trial + 0.5) / spec.trials
                state = start()
                sync()
                request_at = time.perf_counter() + fraction * full_s
                finished = state.run(lambda r=request_at: time.perf_counter() >= r)
                if not finished:
                    latencies.append(time.perf_counter() - request_at)
                    state.run(lambda: False)  # resume to the end: it must match
                max_diff = max(max_diff, float((state.result().last_logits - expected).abs().max()))
            rows.append(
                {
                    "granularity": granularity.value,
                    "checkpoint_sync": mode,
                    "checkpoints": state.num_checkpoints,
                    "prefill_ms": full_s * 1e3,
                    "pauses": len(latencies),
                    "pause_mean_ms": statistics.fmean(latencies) * 1e3 if latencies else None,
                    "pause_p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
                    "pause_max_ms": max(latencies) * 1e3 if latencies else None,
                    "resumed_logits_max_diff": max_diff,
                }
            )
    return rows, None
