"""Per-request sampling parameters: what a request asks for, validated before it goes anywhere.

``SamplingParams`` travels from the HTTP front end through the scheduler to the workers, so it
lives here, free of torch, rather than beside the sampler in ``model/sampling.py``: the front
end and the runtime's messages can import it without loading torch. It sits outside the
``model`` and ``runtime`` packages because both packages' ``__init__`` import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch

# Temperatures below this are treated as 0 (greedy): see ``model.sampling.sample``.
MIN_SAMPLING_TEMPERATURE = 1e-5
# The seeds torch's generators take: any 64-bit value, signed or unsigned (a negative seed is
# taken modulo 2**64, as torch does). Outside this range ``manual_seed`` raises, so such a seed
# is refused when the request is validated, never inside a batch it would fail.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
# The longest ``cache_salt`` a request may carry (characters). Not a sampling parameter, but
# like one it is checked by the front end and by the engine, so it lives here, free of torch.
MAX_CACHE_SALT_CHARS = 256


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
        # Imported here, not above: only the workers that sample call this, and they have
        # torch loaded already; the front end and the messages never do.
        import torch

        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator
