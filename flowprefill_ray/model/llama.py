"""`LlamaModel`: Llama / Mistral / Qwen2 weights and the operator functions of one forward pass.

The forward is split into operators (embedding; per layer: input_norm, qkv_proj, rope,
attention, o_proj, post_norm, gate_up_proj, act, down_proj; then final_norm, lm_head) so a
prefill can stop between any two of them (see `prefill.py`). Tokens of several sequences are
packed along one axis `T`; `cu_seqlens` (int32, `[B+1]`) marks where each sequence starts.
Each operator is a pure function of tensors; the decode path reuses them with one token per
sequence.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from flowprefill_ray.kernels import KernelBackend, kernel_ops

from .config import ModelConfig
from .cpu_matmul import linear, pack_linear_weights, use_onednn
from .kv import KVCache
from .prefill import Granularity, PrefillResult, PrefillState, SyncMode
from .rope import cos_sin, inverse_frequencies
from .weights import ModelWeights, load_weights


class LlamaModel:
    """A loaded Llama-family model. Holds no per-request state: any number of `PrefillState`s
    can be paused while others run on the same model."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernels: KernelBackend | str = KernelBackend.AUTO,
        cpu_matmul: str = "torch",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        # What the matmuls run on: "onednn" (weights packed once, cpu_matmul.py) or "torch".
        self.matmul = "onednn" if use_onednn(cpu_matmul, self.device, dtype) else "torch"
        self.weights = pack_linear_weights(weights) if self.matmul == "onednn" else weights
        self.ops = kernel_ops(kernels, self.device)
        self.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(self.device)
        self.attention_scale = 1.0 / math.sqrt(config.head_dim)

    # ---- operators (all tensors packed over T tokens) -------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[T]` int64 token ids -> hidden `[T, E]`."""
        return F.embedding(token_ids, self.weights.embed_tokens)

    def input_norm(
        self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the previous block's output to the residual stream, then RMS-normalises."""
        weight = self.weights.layers[layer].input_norm
        return self.ops.rms_norm(hidden, weight, self.config.rms_norm_eps, residual)

    def qkv_proj(
        self, layer: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[T, E]` -> q `[T, Hq, D]`, k and v `[T, Hk, D]` with one fused matmul."""
        w = self.weights.layers[layer]
        qkv = linear(x, w.qkv, w.qkv_bias)
        c = self.config
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        t = x.shape[0]
        return (
            q.reshape(t, c.num_attention_heads, c.head_dim),
            k.reshape(t, c.num_key_value_heads, c.head_dim),
            v.reshape(t, c.num_key_value_heads, c.head_dim).contiguous(),
        )

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, D/2]` for absolute token positions `[T]`."""
        return cos_sin(self.inv_freq, positions, self.dtype)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary(q, cos, sin), self.ops.rotary(k, cos, sin)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int | None = None,
    ) -> torch.Tensor:
        """Causal varlen attention; returns `[T, Hq * D]`. `max_seqlen_q` (tokens, longest
        sequence) lets the Triton kernel size its grid without reading `cu_seqlens_q`."""
        out = self.ops.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, self.attention_scale, max_seqlen_q=max_seqlen_q
        )
        return out.reshape(q.shape[0], -1)

    def o_proj(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        return linear(attn, self.weights.layers[layer].o_proj)

    def post_norm(
        self, layer: int, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the attention output to the residual stream, then RMS-normalises."""
        weight = self.weights.layers[layer].post_norm
        return self.ops.rms_norm(hidden, weight, self.config.rms_norm_eps, residual)

    def gate_up_proj(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weights.layers[layer].gate_up)

    def act(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(gate_up)

    def down_proj(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weights.layers[layer].down)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out, _ = self.ops.rms_norm(
            hidden, self.weights.final_norm, self.config.rms_norm_eps, residual
        )
        return out

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, E]` -> logits `[B, vocab]`, always fp32 (sampling and comparisons need it)."""
        return F.linear(x, self.weights.lm_head).float()

    # ---- prefill ----------------------------------------------------------------------------

    def start_prefill(
        self,
        sequences: list[list[int]],
        granularity: Granularity | str = Granularity.BLOCK,
        prefixes: list[KVCache | None] | None = None,
        checkpoint_sync: SyncMode | str = "sync",
        max_run_ahead: int = 2,
    ) -> PrefillState:
        """A paused-at-start prefill of `sequences` (token ids), packed into one forward.

        `prefixes[b]` is the KV of earlier chunks of sequence `b` (chunked prefill); its tokens
        come before `sequences[b]` in position. Nothing runs until `step()`/`run()`.
        """
        return PrefillState(
            self,
            sequences,
            granularity=Granularity(granularity),
            prefixes=prefixes,
            checkpoint_sync=checkpoint_sync,
            max_run_ahead=max_run_ahead,
        )

    def prefill(self, token_ids: list[int], chunk_size: int | None = None) -> PrefillResult:
        """Prefill one prompt straight through, in chunks of `chunk_size` tokens if given.

        Each chunk attends to the KV of the chunks before it, so the result equals an
        unchunked prefill up to floating-point reassociation.
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        if not token_ids:
            raise ValueError("cannot prefill an empty prompt")
        step = chunk_size or len(token_ids)
        prefix: KVCache | None = None
        result: PrefillResult | None = None
        for start in range(0, len(token_ids), step):
            state = self.start_prefill([token_ids[start : start + step]], prefixes=[prefix])
            state.run(lambda: False)
            result = state.result()
            prefix = result.kv[0]
        assert result is not None
        return result

    # ---- decode (implemented in decode.py / generate.py) -------------------------------------

    def decode_step(self, seq_ids, last_tokens, cache) -> torch.Tensor:
        """One new token per sequence over a `PagedKVCache`; logits `[B, vocab]` fp32.
        See `decode.decode_step`."""
        from .decode import decode_step

        return decode_step(self, seq_ids, last_tokens, cache)

    def generate(self, token_ids, params, tokenizer=None) -> list[int]:
        """New token ids after prompt `token_ids` (single-process reference); see
        `generate.generate` (`tokenizer` is needed only for stop strings)."""
        from .generate import generate

        return generate(self, token_ids, params, tokenizer)


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernels: KernelBackend | str = KernelBackend.AUTO,
    cpu_matmul: str = "torch",
) -> LlamaModel:
    """Load a Hugging Face Llama / Mistral / Qwen2 safetensors checkpoint directory.
    ``cpu_matmul``: ``torch`` keeps ``F.linear``; ``onednn`` packs an fp32 CPU model's matmul
    weights for oneDNN (cpu_matmul.py; a deployment's ``ModelSource`` defaults to it); nothing on a GPU."""
    config = ModelConfig.from_pretrained(path)
    weights = load_weights(path, config, device, dtype)
    return LlamaModel(
        config, weights, device=device, dtype=dtype, kernels=kernels, cpu_matmul=cpu_matmul
    )
