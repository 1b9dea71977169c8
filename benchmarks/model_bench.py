"""What the model benchmarks share: the model shape they time and how they time it."""

from __future__ import annotations

import torch

# The tiny-model shape ENVIRONMENT.md profiled (4 layers, hidden 256, GQA 4/2 heads): big enough
# that attention and the MLP dominate, small enough to prefill 8192 tokens on one CPU thread.
BENCH_MODEL_SHAPE = dict(
    num_layers=4, hidden=256, heads=4, kv_heads=2, intermediate=1024, vocab=2048
)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures the compute (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompt(tokens: int, vocab: int) -> list[int]:
    """A deterministic prompt of ``tokens`` ids (seeded by its length; ids 0-2 are special)."""
    generator = torch.Generator().manual_seed(tokens)
    return torch.randint(3, vocab, (tokens,), generator=generator).tolist()
