"""Where the runtime stops and detokenizes a request's output: one object per worker process.

``OutputRules`` holds what the stopping rules need from the model (its EOS ids, its context
length) and the tokenizer, and makes the two per-request helpers from them: the model
package's ``StopChecker`` (EOS, ``max_tokens``, stop strings, context length: the rules of
the single-process reference ``generate``) and the ``Detokenizer`` (text deltas).

Whether the first token already ends a request is decided once, on the prefill worker
(``first_output``), which also makes that token's text: ``FirstToken.finish_reason`` and
``FirstToken.text`` carry both to the engine, which shows them as they are. The decode worker
replays the first token into fresh helpers (``continue_after``) so its checker and its text
deltas carry on from the same state. The engine needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowprefill_ray.model.generate import StopChecker, eos_token_ids
from flowprefill_ray.sampling_params import SamplingParams

from .detokenizer import Detokenizer


@dataclass(frozen=True, slots=True)
class FirstOutput:
    """What the first token means for its request: ``finish_reason`` (None: decode goes on),
    ``shown``: whether the token is part of the output (an EOS or the end of a stop string is
    not), ``text``: the text to send with it (a delta; all of the output's text when it ends)."""

    finish_reason: str | None
    shown: bool
    text: str


class OutputRules:
    """Stop checkers and detokenizers of one model; see the module docstring. Without a
    tokenizer (executor tests) stop strings are refused and texts are empty."""

    def __init__(self, eos_ids: frozenset[int], context_tokens: int, tokenizer: Any = None):
        self.eos_ids = eos_ids
        self.context_tokens = context_tokens
        self.tokenizer = tokenizer

    @classmethod
    def for_model(cls, model, tokenizer: Any = None) -> OutputRules:
        """From a loaded model (its config's EOS ids and context) and its tokenizer."""
        return cls(eos_token_ids(model, tokenizer), model.config.context_limit, tokenizer)

    def checker(self, sampling: SamplingParams, prompt_tokens: int) -> StopChecker:
        return StopChecker(
            sampling, self.eos_ids, prompt_tokens, self.context_tokens, self.tokenizer
        )

    def detokenizer(self, sampling: SamplingParams) -> Detokenizer | None:
        return Detokenizer(self.tokenizer, sampling.stop) if self.tokenizer is not None else None

    def first_output(self, sampling: SamplingParams, prompt_tokens: int, token: int) -> FirstOutput:
        """Decide whether ``token``, a request's first, ends it, and the text it shows."""
        checker = self.checker(sampling, prompt_tokens)
        detok = self.detokenizer(sampling)
        if not checker.add(token):
            return FirstOutput(None, True, detok.add(token) if detok is not None else "")
        text = detok.finish(checker.text) if detok is not None else ""
        return FirstOutput(checker.finish_reason.value, bool(checker.token_ids), text)

    def continue_after(
        self, sampling: SamplingParams, prompt_tokens: int, first_token: int
    ) -> tuple[StopChecker, Detokenizer | None]:
        """A checker and a detokenizer that have seen ``first_token`` (which, as the prefill
        worker decided, did not end the request; its text went out with it)."""
        checker = self.checker(sampling, prompt_tokens)
        checker.add(first_token)
        detok = self.detokenizer(sampling)
        if detok is not None:
            detok.add(first_token)
        return checker, detok
