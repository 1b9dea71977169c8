"""One batched decode step: a new token for each of several sequences of different lengths.

Each sequence's KV lives in a ``PagedKVCache``; the step embeds the last sampled token of every
sequence, runs the same operators as prefill (``LlamaModel``'s operator methods) with one token
per sequence, writes the new K/V into each sequence's next slot and attends over its blocks with
the ``decode_attention`` kernel, then returns next-token logits.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from .errors import SequenceTooLongError
from .paged_kv import PagedKVCache

if TYPE_CHECKING:
    from .llama import LlamaModel


def decode_step(
    model: LlamaModel,
    seq_ids: Sequence[Hashable],
    last_tokens: Sequence[int] | torch.Tensor,
    cache: PagedKVCache,
) -> torch.Tensor:
    """Append ``last_tokens[b]`` to sequence ``seq_ids[b]`` and return logits ``[B, vocab]`` fp32.

    Every sequence must already be in ``cache`` (``cache.add`` after its prefill). The token is
    placed at position ``cache.seq_len(seq_id)``; afterwards the sequence is one token longer.
    Raises ``KVCacheFullError`` (nothing changed) when new blocks are needed but not free, and
    ``SequenceTooLongError`` when a sequence would pass ``max_position_embeddings``. Should the
    forward itself fail after the slots were reserved, the sequences already count the new
    token: free them rather than retry.
    """
    if len(seq_ids) == 0:
        raise ValueError("decode_step needs at least one sequence")
    tokens = torch.as_tensor(last_tokens, dtype=torch.int64).reshape(-1).to(model.device)
    if tokens.numel() != len(seq_ids):
        raise ValueError(f"got {tokens.numel()} last tokens for {len(seq_ids)} sequences")
    _check_cache_fits_model(model, cache)
    _check_positions(model, seq_ids, cache)

    slots = cache.append_slots(seq_ids)
    positions = slots.seq_lens.to(device=model.device, dtype=torch.int64) - 1
    cos, sin = model.rope_tables(positions)
    batch = len(seq_ids)

    hidden = model.embed(tokens)
    residual = None
    for layer in range(model.config.num_hidden_layers):
        x, residual = model.input_norm(layer, hidden, residual)
        q, k, v = model.qkv_proj(layer, x)
        q, k = model.rope(q, k, cos, sin)
        cache.write(layer, slots, k, v)
        attn = model.ops.decode_attention(
            q,
            cache.k_cache[layer],
            cache.v_cache[layer],
            slots.block_tables,
            slots.seq_lens,
            model.attention_scale,
        )
        hidden = model.o_proj(layer, attn.reshape(batch, -1))
        x, residual = model.post_norm(layer, hidden, residual)
        hidden = model.down_proj(layer, model.act(model.gate_up_proj(layer, x)))
    return model.lm_head(model.final_norm(hidden, residual))


def make_cache(model: LlamaModel, num_blocks: int, block_size: int = 16) -> PagedKVCache:
    """A ``PagedKVCache`` shaped for ``model`` (its device and dtype)."""
    return PagedKVCache(
        model.config, num_blocks, block_size=block_size, device=model.device, dtype=model.dtype
    )


def _check_cache_fits_model(model: LlamaModel, cache: PagedKVCache) -> None:
    config = model.config
    want = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    got = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
    if want != got:
        raise ValueError(
            f"the KV cache holds (layers, kv_heads, head_dim)={got} but the model needs {want}"
        )
    if cache.dtype != model.dtype or cache.device != model.device:
        raise ValueError(
            f"the KV cache is {cache.dtype} on {cache.device} but the model runs in "
            f"{model.dtype} on {model.device}; build it with decode.make_cache(model, ...)"
        )


def _check_positions(model: LlamaModel, seq_ids: Sequence[Hashable], cache: PagedKVCache) -> None:
    config = model.config
    limit = config.context_limit
    for seq_id in seq_ids:
        length = cache.seq_len(seq_id) + 1
        if length > limit:
            raise SequenceTooLongError(
                f"sequence {seq_id!r} would reach {length} tokens, more than the model's "
                f"{limit} (max_position_embeddings={config.max_position_embeddings}, "
                f"sliding_window={config.sliding_window}: sliding-window attention is not "
                "implemented)"
            )
