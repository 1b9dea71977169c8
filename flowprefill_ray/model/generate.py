"""Single-process reference generation: prefill, then decode steps on a ``PagedKVCache``.

This is the ground truth that the disaggregated runtime (prefill workers handing KV to decode
workers) must reproduce, and the engine of the in-process demos. ``StopChecker`` holds the
stopping rules (EOS, ``max_tokens``, stop strings, context length) so decode workers apply the
same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from flowprefill_ray.sampling_params import SamplingParams

from .decode import decode_step, make_cache
from .sampling import sample

if TYPE_CHECKING:
    from .llama import LlamaModel


class FinishReason(str, Enum):
    """Why a sequence stopped (OpenAI's ``finish_reason`` values)."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the model's context length


def eos_token_ids(model: LlamaModel, tokenizer: Any = None) -> frozenset[int]:
    """End-of-sequence ids from the model config (int or list) and the tokenizer, if any."""
    ids: set[int] = set()
    configured = model.config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass
class StopChecker:
    """Stopping rules for one sequence; feed it each new token with ``add``.

    ``prompt_tokens`` and ``context_length`` bound the total length (tokens). Stop strings need a
    ``tokenizer``: the decoded output is searched after every token, and the text is cut before
    the first match. An EOS token ends the output and is not part of it.
    """

    params: SamplingParams
    eos_ids: frozenset[int]
    prompt_tokens: int
    context_length: int
    tokenizer: Any = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: str | None = None  # set (stop strings cut off) when a tokenizer is given

    def __post_init__(self) -> None:
        if self.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the output")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> bool:
        """Record a newly sampled ``token``; returns True when the sequence is finished."""
        if self.finished:
            raise RuntimeError("add() after the sequence finished")
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = FinishReason.STOP
            self._decode()
            return True
        self.token_ids.append(token)
        if self.params.stop:
            text = self._decode()
            cut = _first_stop(text, self.params.stop)
            if cut is not None:
                # The token that completed the stop string is dropped with it.
                self.token_ids.pop()
                self.text = text[:cut]
                self.finish_reason = FinishReason.STOP
                return True
        if len(self.token_ids) >= self.params.max_tokens or (
            self.prompt_tokens + len(self.token_ids) >= self.context_length
        ):
            self.finish_reason = FinishReason.LENGTH
            self._decode()
            return True
        return False

    def _decode(self) -> str | None:
        if self.tokenizer is not None:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self.text


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@dataclass
class GenerationOutput:
    """New tokens (prompt excluded, EOS excluded), decoded text (with a tokenizer), and why."""

    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None


def generate_output(
    model: LlamaModel,
    token_ids: list[int],
    params: SamplingParams,
    tokenizer: Any = None,
    block_size: int = 16,
) -> GenerationOutput:
    """Generate a completion of ``token_ids``; see ``generate``. Returns tokens, text, reason."""
    if not token_ids:
        raise ValueError("cannot generate from an empty prompt")
    checker = StopChecker(
        params,
        eos_token_ids(model, tokenizer),
        prompt_tokens=len(token_ids),
        context_length=model.config.context_limit,
        tokenizer=tokenizer,
    )
    generator = params.make_generator(model.device)
    result = model.prefill(token_ids)
    token = _pick(result.last_logits, params, generator)
    if checker.add(token):
        return GenerationOutput(checker.token_ids, checker.finish_reason, checker.text)

    # Room for the prompt and every token still to come, so decoding never runs out of blocks.
    budget = len(token_ids) + params.max_tokens
    cache = make_cache(model, num_blocks=-(-budget // block_size), block_size=block_size)
    seq_id = 0
    cache.add(seq_id, result.kv[0])
    try:
        while True:
            logits = decode_step(model, [seq_id], [token], cache)
            token = _pick(logits, params, generator)
            if checker.add(token):
                return GenerationOutput(checker.token_ids, checker.finish_reason, checker.text)
    finally:
        cache.free(seq_id)


def generate(
    model: LlamaModel,
    token_ids: list[int],
    params: SamplingParams,
    tokenizer: Any = None,
) -> list[int]:
    """New token ids continuing ``token_ids`` (prompt and EOS not included).

    Prefills the prompt, samples the first token from its last logits, then decodes one token
    at a time until EOS (unless ``params.ignore_eos``), ``params.max_tokens`` tokens, a stop
    string (needs ``tokenizer``), or the model's context length.
    """
    return generate_output(model, token_ids, params, tokenizer).token_ids


def chat(
    model: LlamaModel,
    tokenizer: Any,
    messages: list[dict[str, str]] | str,
    params: SamplingParams | None = None,
) -> str:
    """Reply to a conversation (or one user message) using the tokenizer's chat template."""
    prompt = chat_prompt_ids(tokenizer, messages)
    params = params or SamplingParams(temperature=0.0, max_tokens=64)
    return generate_output(model, prompt, params, tokenizer).text or ""


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]] | str) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template, ending with the assistant cue."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass plain prompt tokens instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already writes any special tokens it wants.
    return tokenizer.encode(text, add_special_tokens=False)


def _pick(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    return int(sample(logits[-1:], [params.temperature], [params.top_p], [generator])[0])
