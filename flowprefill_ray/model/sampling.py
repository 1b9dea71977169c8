"""Choosing the next token: per-request sampling parameters and a batched sampler.

Every sequence in a decode batch has its own temperature, top-p and (optionally) seeded random
generator, so one batch can mix greedy and sampled requests, and a seeded request draws the same
tokens no matter which other requests share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Temperatures below this are treated as 0 (greedy): see ``sample``.
MIN_SAMPLING_TEMPERATURE = 1e-5
# The seeds torch's generators take: any 64-bit value, signed or unsigned (a negative seed is
# taken modulo 2**64, as torch does). Outside this range ``manual_seed`` raises, so such a seed
# is refused when the request is validated, never inside a batch it would fail.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


class SamplingParams(BaseModel):
    """How one request's output is generated (OpenAI-style semantics).

    ``max_tokens``: most new tokens to generate (the first token from prefill counts).
    ``temperature``: 0 means greedy (argmax); otherwise logits are divided by it.
    ``top_p``: nucleus sampling; keep the smallest set of most likely tokens whose probability
    reaches ``top_p`` (1.0 keeps all).
    ``stop``: strings that end the output when they appear in the decoded text (not included).
    ``seed``: makes sampling reproducible for this request; ``MIN_SEED``..``MAX_SEED``.
    ``ignore_eos``: keep generating past the end-of-sequence token (fixed-length benchmarks).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        # The OpenAI API accepts a single string or a list of strings.
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty (an empty string would match at once)")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device``, or None (use torch's global RNG)."""
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


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
