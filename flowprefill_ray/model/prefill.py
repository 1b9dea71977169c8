"""`PrefillState`: a prefill that runs one operator at a time and can pause at checkpoints.

A paused state is an ordinary object holding the activations between operators (hidden,
residual, q/k/v in flight) and the KV of the layers already done. Resuming continues at the
next operator, so nothing is recomputed; other states may run on the same model meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

import torch

from .checkpoint_sync import CheckpointSync, SyncMode
from .errors import SequenceTooLongError
from .kv import KVCache

if TYPE_CHECKING:
    from .llama import LlamaModel


class Granularity(str, Enum):
    """Where a running prefill may pause."""

    BLOCK = "block"  # after the attention block and after the MLP block (the paper's default)
    LAYER = "layer"  # after each decoder layer
    OPERATOR = "operator"  # after every operator


# The operators of one decoder layer, in order. A layer's attention block ends at o_proj and
# its MLP block at down_proj; each block's residual add happens in the next norm (fused).
LAYER_OPERATORS = (
    "input_norm",
    "qkv_proj",
    "rope",
    "attention",
    "o_proj",
    "post_norm",
    "gate_up_proj",
    "act",
    "down_proj",
)
_BLOCK_ENDS = ("o_proj", "down_proj")
_HEAD_OPERATORS = ("final_norm", "lm_head")


class Cursor(NamedTuple):
    """The next operator to run: `layer` is -1 for the embedding, `num_layers` for the head
    (final norm, lm_head); `operator` indexes the operators of that layer."""

    layer: int
    operator: int


class Operator(NamedTuple):
    layer: int
    operator: int
    name: str


def build_program(num_layers: int) -> list[Operator]:
    """The full operator sequence of a forward pass (1 + 9 * layers + 2 operators)."""
    program = [Operator(-1, 0, "embed")]
    for layer in range(num_layers):
        program += [Operator(layer, i, name) for i, name in enumerate(LAYER_OPERATORS)]
    program += [Operator(num_layers, i, name) for i, name in enumerate(_HEAD_OPERATORS)]
    return program


def checkpoint_positions(program: list[Operator], granularity: Granularity) -> frozenset[int]:
    """Program indices `i` such that a checkpoint lies right after operator `i`.

    The last operator is excluded: after it the prefill is done, not paused.
    """
    last = len(program) - 1
    if granularity is Granularity.OPERATOR:
        return frozenset(range(last))
    ends = ("down_proj",) if granularity is Granularity.LAYER else _BLOCK_ENDS
    return frozenset(i for i, op in enumerate(program) if op.name in ends and i < last)


@dataclass
class PrefillResult:
    """`last_logits` `[B, vocab]` fp32 for the last token of each sequence; `kv[b]` covers all
    tokens of sequence `b`, its prefix included."""

    last_logits: torch.Tensor
    kv: list[KVCache]


class PrefillState:
    """One (possibly batched) prefill in progress. Build it with `LlamaModel.start_prefill`."""

    def __init__(
        self,
        model: LlamaModel,
        sequences: list[list[int]],
        granularity: Granularity = Granularity.BLOCK,
        prefixes: list[KVCache | None] | None = None,
        checkpoint_sync: SyncMode = "sync",
        max_run_ahead: int = 2,
    ) -> None:
        config = model.config
        # Internal invariants for direct users of the model (tests, generate, benchmarks), not
        # a request validation path: the engine refuses requests that break them where they
        # enter (RequestLimits.build, engine_request.py), so served requests never get here.
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("start_prefill needs at least one sequence, each with >= 1 token")
        if prefixes is None:
            prefixes = [None] * len(sequences)
        if len(prefixes) != len(sequences):
            raise ValueError(
                f"got {len(prefixes)} prefixes for {len(sequences)} sequences; pass one "
                "(or None) per sequence"
            )
        prefix_lens = [0 if p is None else p.num_tokens for p in prefixes]
        for b, (seq, prefix_len) in enumerate(zip(sequences, prefix_lens, strict=True)):
            total = prefix_len + len(seq)
            if total > config.max_position_embeddings:
                raise SequenceTooLongError(
                    f"sequence {b} has {total} tokens ({prefix_len} in its prefix), more than "
                    f"max_position_embeddings={config.max_position_embeddings}"
                )
            if config.sliding_window is not None and total > config.sliding_window:
                raise SequenceTooLongError(
                    f"sequence {b} has {total} tokens, more than sliding_window="
                    f"{config.sliding_window}; sliding-window attention is not implemented"
                )
        for p in prefixes:
            if p is not None and p.num_layers != config.num_hidden_layers:
                raise ValueError(
                    f"prefix KV has {p.num_layers} layers, the model has {config.num_hidden_layers}"
                )

        device = model.device
        self.model = model
        self.granularity = Granularity(granularity)
        self.num_sequences = len(sequences)
        self.prefixes = prefixes
        self._has_prefix = any(n > 0 for n in prefix_lens)
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
        token_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {config.vocab_size}) (vocab_size); got range "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]"
            )
        self._token_ids = token_ids.to(device)
        zero = torch.zeros(1, dtype=torch.int32)
        self._cu_q = torch.cat([zero, lengths.cumsum(0, dtype=torch.int32)])
        # Host copy for slicing: reading the device tensor would synchronise a CUDA stream.
        self._cu_q_host: list[int] = self._cu_q.tolist()
        self._max_seqlen_q = max(len(s) for s in sequences)
        key_lengths = lengths + torch.tensor(prefix_lens, dtype=torch.int32)
        self._cu_k = torch.cat([zero, key_lengths.cumsum(0, dtype=torch.int32)])
        positions = torch.cat(
            [
                torch.arange(n, n + len(s), dtype=torch.int64)
                for s, n in zip(sequences, prefix_lens, strict=True)
            ]
        )
        self._cos, self._sin = model.rope_tables(positions.to(device))
        self._cu_q, self._cu_k = self._cu_q.to(device), self._cu_k.to(device)

        self._program = build_program(config.num_hidden_layers)
        self._checkpoints = checkpoint_positions(self._program, self.granularity)
        self._next = 0  # index into _program of the next operator
        self._sync = CheckpointSync(checkpoint_sync, device, max_run_ahead)

        # Activations between operators; None when not live.
        self._hidden: torch.Tensor | None = None  # block output, not yet added to residual
        self._residual: torch.Tensor | None = None
        self._x: torch.Tensor | None = None  # normed input / attention out / MLP intermediate
        self._q: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        # KV of this state's new tokens, one [T, Hk, D] per layer done so far.
        self._layer_k: list[torch.Tensor] = []
        self._layer_v: list[torch.Tensor] = []
        self._last_logits: torch.Tensor | None = None
        self._result: PrefillResult | None = None

        # Seconds spent inside step()/run(). On CUDA, launches are asynchronous: the value
        # includes device time up to the last checkpoint wait, and all of it after a pause or
        # the end (both drain the stream).
        self.executed_s = 0.0
        self.checkpoints_passed = 0

    # ---- progress ----------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """New tokens in this prefill (prefix tokens excluded)."""
        return int(self._token_ids.numel())

    @property
    def done(self) -> bool:
        return self._next >= len(self._program)

    @property
    def cursor(self) -> Cursor:
        """The next operator to run (`Cursor(num_layers + 1, 0)` once done)."""
        if self.done:
            return Cursor(self.model.config.num_hidden_layers + 1, 0)
        op = self._program[self._next]
        return Cursor(op.layer, op.operator)

    @property
    def next_operator(self) -> str | None:
        """Name of the next operator, None once done."""
        return None if self.done else self._program[self._next].name

    @property
    def num_operators(self) -> int:
        return len(self._program)

    @property
    def num_checkpoints(self) -> int:
        """Checkpoints in the whole forward at this state's granularity."""
        return len(self._checkpoints)

    @property
    def checkpoint_sync(self) -> CheckpointSync:
        """How this prefill waits for the device at checkpoints (its mode and run-ahead)."""
        return self._sync

    @property
    def at_checkpoint(self) -> bool:
        """True when the last operator run is followed by a checkpoint."""
        return (self._next - 1) in self._checkpoints

    @property
    def nbytes(self) -> int:
        """Memory this state keeps alive while paused, bytes: live activations, the KV written
        so far, rope tables, and the prefix KV it references."""
        live = [self._hidden, self._residual, self._x, self._q, self._k, self._v]
        live += [self._cos, self._sin, self._last_logits, self._token_ids]
        total = sum(t.nbytes for t in live if t is not None)
        total += sum(t.nbytes for t in self._layer_k) + sum(t.nbytes for t in self._layer_v)
        total += sum(p.nbytes for p in self.prefixes if p is not None)
        return total

    # ---- execution ---------------------------------------------------------------------------

    def step(self) -> None:
        """Run exactly one operator."""
        if self.done:
            raise RuntimeError("step() on a finished prefill")
        started = time.perf_counter()
        op = self._program[self._next]
        getattr(self, "_op_" + op.name)(op.layer)
        self._next += 1
        if self._next - 1 in self._checkpoints:
            self.checkpoints_passed += 1
        self.executed_s += time.perf_counter() - started

    def run(self, should_pause: Callable[[], bool]) -> bool:
        """Run operators; at each checkpoint, wait for the device (per `checkpoint_sync`) and
        call `should_pause()`. Returns True when done, False when it paused (call `run` again
        to resume)."""
        while not self.done:
            self.step()
            if self.done:
                break
            if self.at_checkpoint:
                started = time.perf_counter()
                self._sync.checkpoint()
                self.executed_s += time.perf_counter() - started
                if should_pause():
                    self._drain()
                    return False
        self._drain()
        return True

    def run_until_checkpoint(self) -> bool:
        """Run up to the next checkpoint (or the end). Returns True when done."""
        return self.run(lambda: True)

    def result(self) -> PrefillResult:
        """Logits of each sequence's last token and the per-sequence KV (prefixes included)."""
        if not self.done:
            raise RuntimeError(f"prefill is not finished (next operator at {self.cursor})")
        if self._result is None:
            self._result = PrefillResult(self._last_logits, self._per_sequence_kv())
            self._layer_k, self._layer_v = [], []  # now owned by the result
        return self._result

    def _drain(self) -> None:
        started = time.perf_counter()
        self._sync.drain()
        self.executed_s += time.perf_counter() - started

    # ---- operators ---------------------------------------------------------------------------

    def _op_embed(self, layer: int) -> None:
        self._hidden = self.model.embed(self._token_ids)

    def _op_input_norm(self, layer: int) -> None:
        self._x, self._residual = self.model.input_norm(layer, self._hidden, self._residual)
        self._hidden = None

    def _op_qkv_proj(self, layer: int) -> None:
        self._q, self._k, self._v = self.model.qkv_proj(layer, self._x)
        self._x = None
        self._layer_v.append(self._v)

    def _op_rope(self, layer: int) -> None:
        self._q, self._k = self.model.rope(self._q, self._k, self._cos, self._sin)
        self._layer_k.append(self._k)

    def _op_attention(self, layer: int) -> None:
        k, v = self._k, self._v
        if self._has_prefix:
            k, v = self._with_prefix(layer, k, v)
        self._x = self.model.attention(
            self._q, k, v, self._cu_q, self._cu_k, max_seqlen_q=self._max_seqlen_q
        )
        self._q = self._k = self._v = None

    def _op_o_proj(self, layer: int) -> None:
        self._hidden = self.model.o_proj(layer, self._x)
        self._x = None

    def _op_post_norm(self, layer: int) -> None:
        self._x, self._residual = self.model.post_norm(layer, self._hidden, self._residual)
        self._hidden = None

    def _op_gate_up_proj(self, layer: int) -> None:
        self._x = self.model.gate_up_proj(layer, self._x)

    def _op_act(self, layer: int) -> None:
        self._x = self.model.act(self._x)

    def _op_down_proj(self, layer: int) -> None:
        self._hidden = self.model.down_proj(layer, self._x)
        self._x = None

    def _op_final_norm(self, layer: int) -> None:
        # Only each sequence's last token feeds the lm_head, so only those rows are normed.
        last = (self._cu_q[1:] - 1).long()
        self._x = self.model.final_norm(self._hidden[last], self._residual[last])
        self._hidden = self._residual = None

    def _op_lm_head(self, layer: int) -> None:
        self._last_logits = self.model.lm_head(self._x)
        self._x = None

    # ---- KV ----------------------------------------------------------------------------------

    def _with_prefix(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed keys/values of `layer` with each sequence's prefix placed before its tokens."""
        k_parts, v_parts = [], []
        cu = self._cu_q_host
        for b, prefix in enumerate(self.prefixes):
            if prefix is not None:
                k_parts.append(prefix.k[layer])
                v_parts.append(prefix.v[layer])
            k_parts.append(k[cu[b] : cu[b + 1]])
            v_parts.append(v[cu[b] : cu[b + 1]])
        return torch.cat(k_parts), torch.cat(v_parts)

    def _per_sequence_kv(self) -> list[KVCache]:
        k_all = torch.stack(self._layer_k)  # [L, T, Hk, D]
        v_all = torch.stack(self._layer_v)
        cu = self._cu_q_host
        caches = []
        for b, prefix in enumerate(self.prefixes):
            k, v = k_all[:, cu[b] : cu[b + 1]], v_all[:, cu[b] : cu[b + 1]]
            if prefix is not None:
                k, v = torch.cat([prefix.k, k], dim=1), torch.cat([prefix.v, v], dim=1)
            caches.append(KVCache(k.contiguous(), v.contiguous()))
        return caches
