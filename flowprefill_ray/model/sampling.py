"""Choosing the next token: a batched sampler driven by per-request sampling parameters.

Every sequence in a decode batch has its own temperature, top-p and (optionally) seeded random
generator, so one batch can mix greedy and sampled requests, and a seeded request draws the same
tokens no matter which other requests share its batch.

``SamplingParams`` itself lives in ``flowprefill_ray.sampling_params``, free of torch, so the
front end and the runtime's messages need not load torch; it is re-exported here for callers
that import it from the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowprefill_ray.sampling_params import (
    MAX_SEED,
    MIN_SAMPLING_TEMPERATURE,
    MIN_SEED,
    SamplingParams,
)

__all__ = [
    "MAX_SEED",
    "MIN_SAMPLING_TEMPERATURE",
    "MIN_SEED",
    "SamplingParams",
    "sample",
    "sample_with_params",
    "top_p_filter",
]


def top_p_filter(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Zero all but the nucleus of each row of ``probs[..., V]``: the most likely tokens whose
    mass reaches ``top_p`` (a float, or one value per row). The most likely token is always
    kept. Returns renormalised probabilities."""
    top_p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device)
    if bool((top_p >= 1.0).all()):
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # Mass of the tokens strictly more likely than each token: a token is in the nucleus while
    # that mass is still below top_p, so the token that crosses the threshold is included.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p.unsqueeze(-1)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperatures: Sequence[float] | torch.Tensor,
    top_ps: Sequence[float] | torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits[B, vocab]``; returns int64 token ids ``[B]``.

    Row ``b`` is greedy (argmax) when ``temperatures[b] < MIN_SAMPLING_TEMPERATURE`` (0 included);
    otherwise it is sampled from ``softmax(logits[b] / temperatures[b])`` restricted to the
    ``top_ps[b]`` nucleus, drawing from ``generators[b]`` (None: torch's global RNG). Computed
    in fp32 whatever the logits' dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    temps = [float(t) for t in temperatures]
    tops = [float(p) for p in top_ps]
    gens = list(generators) if generators is not None else [None] * batch
    if not (len(temps) == len(tops) == len(gens) == batch):
        raise ValueError(
            f"sample() got {batch} rows of logits but {len(temps)} temperatures, "
            f"{len(tops)} top_ps and {len(gens)} generators"
        )
    tokens = torch.argmax(logits, dim=-1)
    # A positive temperature this small is greedy in effect, and dividing by it would overflow
    # (1e-53 is 0 in float32): such rows take the argmax too.
    rows = [b for b in range(batch) if temps[b] >= MIN_SAMPLING_TEMPERATURE]
    if not rows:
        return tokens
    # Tempering and the nucleus are computed for all sampled rows at once; only the draw is
    # per row, because each row may have its own seeded generator.
    device = logits.device
    temp_t = torch.tensor([temps[b] for b in rows], dtype=torch.float32, device=device)
    top_t = torch.tensor([tops[b] for b in rows], dtype=torch.float32, device=device)
    probs = torch.softmax(logits[rows].float() / temp_t.unsqueeze(-1), dim=-1)
    probs = top_p_filter(probs, top_t)
    for i, b in enumerate(rows):
        tokens[b] = torch.multinomial(probs[i], 1, generator=gens[b])[0]
    return tokens


def sample_with_params(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """``sample`` with each row's temperature and top-p taken from its ``SamplingParams``."""
    return sample(logits, [p.temperature for p in params], [p.top_p for p in params], generators)
