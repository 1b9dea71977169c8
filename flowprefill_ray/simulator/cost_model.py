"""What a work unit costs on a prefill worker, block by block.

A prefill forward runs ``overhead`` (launch, embedding, scheduling), then per layer an
attention block and an MLP block, then a ``tail`` (final norm and logits of each sequence's
last token). Checkpoints (where a preempted unit can stop) sit after blocks or operators:

- ``block``: after every attention block and every MLP block (the paper's default),
- ``layer``: after every MLP block,
- ``operator``: after the embedding and after every operator of every layer (norm, QKV
  projection, RoPE, attention, output projection; norm, gate/up, activation, down), as
  ``model/prefill.py`` does; a cost model that does not price operators separately (no
  ``attention_ops``/``mlp_ops``) has a block's end as its only operator boundary there,
- ``unit``: nowhere inside the unit (run to completion; what FCFS/DistServe do).

Every layer of a decoder has the same shape, so one attention and one MLP cost per unit
describe all layers. Times are seconds.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Granularity = Literal["block", "layer", "operator", "unit"]


@dataclass(frozen=True, slots=True)
class ItemShape:
    """One sequence's share of a unit: ``new_tokens`` computed now, attending to
    ``context_tokens`` of KV computed earlier (previous chunks)."""

    new_tokens: int
    context_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UnitCost:
    """Compute time of one unit, split at its possible checkpoints (seconds)."""

    overhead_s: float
    attention_s: float  # one layer's attention block
    mlp_s: float  # one layer's MLP block
    num_layers: int
    tail_s: float
    # Each operator's share of its block's time, in order (fractions summing to 1), so that a
    # wrapper scaling the block times (``NoisyCostModel``) scales the operators with them.
    attention_ops: tuple[float, ...] = (1.0,)
    mlp_ops: tuple[float, ...] = (1.0,)

    @property
    def total_s(self) -> float:
        return self.overhead_s + self.num_layers * (self.attention_s + self.mlp_s) + self.tail_s

    def checkpoints(self, granularity: Granularity) -> list[float]:
        """Elapsed compute times (s from the unit's start) at which it may stop, ascending;
        the unit's end is not a checkpoint (stopping there is completing)."""
        if granularity == "unit":
            return []
        if granularity == "operator":
            return self._operator_checkpoints()
        times = []
        t = self.overhead_s
        for _ in range(self.num_layers):
            t += self.attention_s
            if granularity == "block":
                times.append(t)
            t += self.mlp_s
            times.append(t)
        total = self.total_s
        # The last MLP block's checkpoint coincides with the end when tail_s is 0.
        return [c for c in times if c < total]

    def _operator_checkpoints(self) -> list[float]:
        ops = [self.attention_s * f for f in self.attention_ops]
        ops.extend(self.mlp_s * f for f in self.mlp_ops)
        times = [self.overhead_s]  # after the embedding
        t = self.overhead_s
        for _ in range(self.num_layers):
            for op_s in ops:
                t += op_s
                times.append(t)
        total = self.total_s
        return [c for c in times if 0.0 < c < total]

    def next_checkpoint(self, elapsed_s: float, granularity: Granularity) -> float | None:
        """The first checkpoint at or after ``elapsed_s`` seconds of compute, or None when the
        unit reaches its end first."""
        points = self.checkpoints(granularity)
        # A relative tolerance absorbs float error when elapsed_s was itself a checkpoint.
        i = bisect.bisect_left(points, elapsed_s - 1e-12 * max(1.0, elapsed_s))
        return points[i] if i < len(points) else None


class CostModel(Protocol):
    """Anything that prices a unit: the measured CPU profile or a GPU roofline."""

    name: str
    num_layers: int

    def unit_cost(self, items: Sequence[ItemShape]) -> UnitCost:
        """Cost of running these sequences together as one packed forward."""
        ...


def prefill_time_s(model: CostModel, tokens: int) -> float:
    """Seconds to prefill one ``tokens``-long prompt as a single unit."""
    return model.unit_cost([ItemShape(tokens)]).total_s


def chunked_prefill_time_s(model: CostModel, tokens: int, chunk_tokens: int) -> float:
    """Seconds to prefill one prompt in back-to-back chunks of ``chunk_tokens``; each chunk
    pays its overhead and attends to all earlier chunks' KV."""
    total = 0.0
    for start in range(0, tokens, chunk_tokens):
        total += model.unit_cost([ItemShape(min(chunk_tokens, tokens - start), start)]).total_s
    return total


@dataclass(frozen=True, slots=True)
class UnitTimeline:
    """A unit as the worker runs it: one or more forwards back to back.

    The runtime runs an item longer than ``max_forward_tokens`` as consecutive forwards (each
    later piece attends the KV of the earlier ones), with no scheduling decision in between;
    a pause may happen inside any forward, or between two of them.
    """

    forwards: tuple[UnitCost, ...]

    @property
    def total_s(self) -> float:
        return sum(f.total_s for f in self.forwards)

    def checkpoints(self, granularity: Granularity) -> list[float]:
        """Elapsed compute times (s) at which the unit may stop, ascending, end excluded."""
        if granularity == "unit":
            return []
        points: list[float] = []
        offset = 0.0
        for i, f in enumerate(self.forwards):
            points.extend(offset + c for c in f.checkpoints(granularity))
            offset += f.total_s
            if i < len(self.forwards) - 1:
                points.append(offset)  # between two forwards
        return points

    def next_checkpoint(self, elapsed_s: float, granularity: Granularity) -> float | None:
        """The first checkpoint at or after ``elapsed_s`` seconds of compute, or None when the
        unit reaches its end first."""
        points = self.checkpoints(granularity)
        i = bisect.bisect_left(points, elapsed_s - 1e-12 * max(1.0, elapsed_s))
        return points[i] if i < len(points) else None


def plan_unit(
    model: CostModel, items: Sequence[ItemShape], max_forward_tokens: int
) -> UnitTimeline:
    """The forwards a worker runs for ``items``: every forward packs the next piece (at most
    ``max_forward_tokens``) of each item not yet done, as the runtime's executor does."""
    done = [0] * len(items)
    forwards = []
    while True:
        shapes = [
            ItemShape(min(max_forward_tokens, it.new_tokens - d), it.context_tokens + d)
            for it, d in zip(items, done, strict=True)
            if d < it.new_tokens
        ]
        if not shapes:
            break
        forwards.append(model.unit_cost(shapes))
        done = [
            min(it.new_tokens, d + max_forward_tokens) for it, d in zip(items, done, strict=True)
        ]
    return UnitTimeline(tuple(forwards))
