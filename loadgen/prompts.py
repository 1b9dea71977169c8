"""Prompts of a given length in tokens.

For ``/v1/completions`` the prompt is a list of token ids, so the server sees exactly
``prompt_tokens`` tokens whatever its tokenizer (OpenAI, vLLM, SGLang and our server all accept
token-id prompts). Ids are drawn uniformly from a configured range, seeded per request so every
run of a plan sends identical prompts; distinct requests get distinct prompts, so a prefix cache
cannot make a replay look faster than the trace it stands for.

For ``/v1/chat/completions`` only text can be sent: the prompt is built from short common
words, one word per intended token. Most BPE tokenizers give one token per such word with its
leading space, but the chat template adds its own tokens, so chat prompt lengths are
approximate; use the completions API when the length matters.
"""

from __future__ import annotations

import random

_WORDS = (
    "the of and to in is it that for on as with was at by be this from or an are not but all "
    "can one out up so if no new more time day way who now how see get may use two man her"
).split()


def _rng(seed: int, request_id: str) -> random.Random:
    return random.Random(f"{seed}:{request_id}")


def prompt_token_ids(
    prompt_tokens: int, seed: int, request_id: str, low: int, high: int
) -> list[int]:
    """``prompt_tokens`` token ids in ``[low, high)``, the same for the same seed and id."""
    if prompt_tokens < 1:
        raise ValueError(f"a prompt needs at least one token, got {prompt_tokens}")
    rng = _rng(seed, request_id)
    return [rng.randrange(low, high) for _ in range(prompt_tokens)]


def prompt_text(prompt_tokens: int, seed: int, request_id: str) -> str:
    """About ``prompt_tokens`` tokens of text (one common word per token; see module doc)."""
    if prompt_tokens < 1:
        raise ValueError(f"a prompt needs at least one token, got {prompt_tokens}")
    rng = _rng(seed, request_id)
    return " ".join(rng.choice(_WORDS) for _ in range(prompt_tokens))
