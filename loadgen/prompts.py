"""Prompts of a given length in tokens.

For ``/v1/completions`` the prompt is a list of token ids, so the server sees exactly
``prompt_tokens`` tokens whatever its tokenizer (OpenAI, vLLM, SGLang and our server all accept
token-id prompts). Ids are drawn uniformly from a configured range, seeded per request so every
run of a plan sends identical prompts; distinct requests get distinct prompts, so a prefix cache
cannot make a replay look faster than the trace it stands for.

A trace with prompt-block hash ids (Mooncake, the multi-turn workload) is sent differently:
each hash id stands for one block of ``block_tokens`` token ids, drawn from the same range but
seeded by the run seed and the hash id alone, and a prompt is its blocks in order, the last
one cut so the prompt has its planned length. Requests whose hash ids agree on their first
``k`` blocks therefore send identical first ``k * block_tokens`` tokens, and a live replay
exercises the server's prefix cache as the trace's sharing says it should. Tokens past the
last block (a prompt scaled beyond its blocks) are the request's own.

For ``/v1/chat/completions`` only text can be sent: the prompt is built from short common
words, one word per intended token. Most BPE tokenizers give one token per such word with its
leading space, but the chat template adds its own tokens, so chat prompt lengths are
approximate; use the completions API when the length matters.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

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


@lru_cache(maxsize=4096)  # a prefix shared by many requests is drawn once
def _block(seed: int, hash_id: int, block_tokens: int, low: int, high: int) -> tuple[int, ...]:
    rng = random.Random(f"{seed}:block:{hash_id}")
    return tuple(rng.choices(range(low, high), k=block_tokens))


def block_prompt_token_ids(
    prompt_tokens: int,
    hash_ids: Sequence[int],
    block_tokens: int,
    seed: int,
    request_id: str,
    low: int,
    high: int,
) -> list[int]:
    """``prompt_tokens`` ids: the blocks of ``hash_ids`` in order, cut to length (module doc).

    The same hash id gives the same block in every request of a run (same seed); a prompt
    longer than its blocks ends with tokens of its own (seeded by ``request_id``).
    """
    if prompt_tokens < 1:
        raise ValueError(f"a prompt needs at least one token, got {prompt_tokens}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    ids: list[int] = []
    for hash_id in hash_ids:
        if len(ids) >= prompt_tokens:
            break
        ids.extend(_block(seed, hash_id, block_tokens, low, high))
    if len(ids) < prompt_tokens:
        ids.extend(prompt_token_ids(prompt_tokens - len(ids), seed, request_id, low, high))
    return ids[:prompt_tokens]


def block_prompt_text(
    prompt_tokens: int, hash_ids: Sequence[int], block_tokens: int, seed: int, request_id: str
) -> str:
    """The chat counterpart of ``block_prompt_token_ids``: one common word per intended token,
    the words of a block fixed by its hash id, so shared blocks are identical text."""
    word_ids = block_prompt_token_ids(
        prompt_tokens, hash_ids, block_tokens, seed, request_id, 0, len(_WORDS)
    )
    return " ".join(_WORDS[i] for i in word_ids)
