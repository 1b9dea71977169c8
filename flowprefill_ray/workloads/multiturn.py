"""A multi-turn chat workload: conversations whose every turn resends the whole history.

Turn ``n + 1`` of a conversation asks with its previous prompt, the answer to it and a new
question, so its prompt begins with exactly turn ``n``'s prompt followed by turn ``n``'s answer:
the traffic a prefix cache exists for. Every conversation opens with the same system prompt.

The workload carries no tokens, only Mooncake-style ``hash_ids`` (see ``TraceRecord``): a
conversation is one stream of tokens (system prompt, question 1, answer 1, question 2, ...)
cut into blocks of ``block_tokens``, each block one hash id, and each turn's prompt is a prefix
of that stream. So turn ``n + 1``'s hash ids begin with all of turn ``n``'s (its last, partial
block being a prefix of the same block in turn ``n + 1``). The load generator builds the
tokens of each block from its hash id (``loadgen.prompts.block_prompt_token_ids``), so the
prompts it sends really share those prefixes.

The answers are stand-ins: an open-loop replay sends turn ``n + 1`` at its planned time
without waiting for turn ``n``'s real answer, so the "answer" inside turn ``n + 1``'s prompt is
``answer_tokens`` generated tokens, not what the model said. Turn ``n`` asks for
``answer_tokens`` output tokens, so the lengths are those of the real conversation.

Only the system prompt's full blocks are shared between conversations: the block holding its
last tokens and the first question's start belongs to one conversation.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from .trace import TraceRecord, Workload


class MultiTurnConfig(BaseModel):
    """A multi-turn chat workload.

    ``conversations``: how many; they start ``conversation_interval_s`` apart on average
    (exponential gaps, seeded by ``seed``; the first starts at 0). ``turns``: requests per
    conversation. ``system_prompt_tokens``: the prompt every conversation opens with.
    ``question_tokens`` / ``answer_tokens``: the new user text per turn and the answer (the
    output each turn asks for; its stand-in is in the next turn's prompt).
    ``think_time_s``: seconds from one turn's send to the next turn's (it covers the answer's
    generation too, since an open-loop replay does not wait for it). ``block_tokens``: tokens
    per hash-id block.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    conversations: int = Field(default=8, ge=1)
    turns: int = Field(default=4, ge=1)
    system_prompt_tokens: int = Field(default=256, ge=0)
    question_tokens: int = Field(default=48, ge=1)
    answer_tokens: int = Field(default=32, ge=1)
    think_time_s: float = Field(default=5.0, ge=0.0)
    conversation_interval_s: float = Field(default=2.0, ge=0.0)
    seed: int = 0
    block_tokens: int = Field(default=32, ge=1)


def turn_prompt_tokens(config: MultiTurnConfig, turn: int) -> int:
    """Prompt length of turn ``turn`` (0-based): system prompt, ``turn + 1`` questions and the
    ``turn`` answers before it."""
    return (
        config.system_prompt_tokens
        + (turn + 1) * config.question_tokens
        + turn * config.answer_tokens
    )


def multiturn_workload(config: MultiTurnConfig | None = None) -> Workload:
    """The workload of ``config``: ``conversations * turns`` requests sorted by arrival."""
    config = config or MultiTurnConfig()
    block = config.block_tokens
    shared_blocks = config.system_prompt_tokens // block  # full system-prompt blocks
    stream_blocks = -(-turn_prompt_tokens(config, config.turns - 1) // block)
    rng = random.Random(f"multiturn:{config.seed}")
    next_id = shared_blocks  # ids 0 .. shared_blocks - 1 are the system prompt's
    start = 0.0
    records = []
    for conversation in range(config.conversations):
        if conversation and config.conversation_interval_s > 0:
            start += rng.expovariate(1.0 / config.conversation_interval_s)
        own = stream_blocks - shared_blocks
        stream = tuple(range(shared_blocks)) + tuple(range(next_id, next_id + own))
        next_id += own
        for turn in range(config.turns):
            tokens = turn_prompt_tokens(config, turn)
            records.append(
                TraceRecord(
                    arrival_s=start + turn * config.think_time_s,
                    prompt_tokens=tokens,
                    output_tokens=config.answer_tokens,
                    hash_ids=stream[: -(-tokens // block)],
                )
            )
    records.sort(key=lambda r: r.arrival_s)
    name = f"multiturn-{config.conversations}x{config.turns}-seed{config.seed}"
    return Workload(name, tuple(records), block_tokens=block)
