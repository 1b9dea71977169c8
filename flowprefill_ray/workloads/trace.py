"""A request trace: when requests arrive and how long their prompts and answers are.

Every loader and generator in this package returns a ``Workload``; the simulator, the Ray
runtime and the load generator all consume it. Arrival times are seconds from the start of
the trace (the first request arrives at 0 unless a window was cut out of a longer trace).
``Workload.to_requests`` turns one into the scheduler's ``Request`` objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowprefill_ray.scheduling import Request, SLOConfig


class TraceFormatError(ValueError):
    """A trace file has a row that cannot be read; the message names the file and line."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a trace.

    ``arrival_s``: seconds since the trace start. ``prompt_tokens``/``output_tokens``: token
    counts. ``slo_class``: the TTFT SLO class name (``text``, ``image``, ...) or None when the
    trace does not say (see ``slo_assignment``). ``hash_ids``: Mooncake-style prompt block
    hashes when the trace has them: one id per ``Workload.block_tokens`` tokens of the prompt,
    the last block possibly partial; equal ids at the same position mean identical prompts up
    to the end of that block. The load generator turns them into prompts whose shared blocks
    are identical tokens (``loadgen.prompts.block_prompt_token_ids``). ``to_requests`` passes
    the full blocks' ids on as ``Request.prefix_hashes``.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    slo_class: str | None = None
    hash_ids: tuple[int, ...] = ()


def _rescaled_length(record: TraceRecord, old: int, new: int) -> int:
    """``record``'s prompt length with blocks of ``new`` instead of ``old`` tokens."""
    blocks = len(record.hash_ids)
    if blocks == 0:  # no block structure to keep: plain proportional scaling
        return max(1, -(-record.prompt_tokens * new // old))
    last = record.prompt_tokens - (blocks - 1) * old
    if not 0 < last <= old:
        raise ValueError(
            f"a record of {record.prompt_tokens} tokens cannot have {blocks} blocks of {old}"
        )
    return (blocks - 1) * new + max(1, -(-last * new // old))


@dataclass(frozen=True)
class Workload:
    """An ordered, immutable sequence of ``TraceRecord`` (sorted by arrival).

    Transformations (``scale_rate``, ``window``, ``head``, ``with_slo_classes``,
    ``with_block_tokens``) return new workloads; ``name`` records where it came from and what
    was done to it. ``block_tokens``: tokens per ``hash_ids`` block (512 for Mooncake, 16 for
    Qwen-Bailian), None for a trace without hash ids.
    """

    name: str
    records: tuple[TraceRecord, ...]
    skipped_rows: int = 0  # rows a loader dropped on purpose (e.g. failed requests)
    block_tokens: int | None = None

    def __post_init__(self) -> None:
        records = tuple(self.records)
        if any(b.arrival_s < a.arrival_s for a, b in zip(records, records[1:], strict=False)):
            records = tuple(sorted(records, key=lambda r: r.arrival_s))
        object.__setattr__(self, "records", records)
        if self.block_tokens is not None and self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")

    def _derived(self, name: str, records: tuple[TraceRecord, ...]) -> Workload:
        """A workload of ``records`` that keeps this one's skipped count and block size."""
        return Workload(name, records, self.skipped_rows, self.block_tokens)

    # ------------------------------------------------------------------ basic views

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> TraceRecord:
        return self.records[index]

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0 for fewer than two requests)."""
        if len(self.records) < 2:
            return 0.0
        return self.records[-1].arrival_s - self.records[0].arrival_s

    @property
    def mean_rate_per_s(self) -> float:
        """Average arrival rate in requests per second over the trace's span."""
        if self.duration_s <= 0:
            return 0.0
        return (len(self.records) - 1) / self.duration_s

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.records)

    @property
    def slo_classes(self) -> dict[str, int]:
        """Request count per SLO class (``None`` counted under ``"unassigned"``)."""
        counts: dict[str, int] = {}
        for r in self.records:
            key = r.slo_class if r.slo_class is not None else "unassigned"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ------------------------------------------------------------------ transformations

    def scale_rate(self, scale: float) -> Workload:
        """Compress inter-arrival gaps by ``scale``: scale 2 gives twice the arrival rate.

        The first arrival stays where it is; every gap is divided by ``scale``. Lengths and
        classes are unchanged, so the load rises without changing what is asked.
        """
        if not scale > 0:
            raise ValueError(f"rate scale must be > 0, got {scale}")
        if not self.records:
            return self
        t0 = self.records[0].arrival_s
        scaled = tuple(replace(r, arrival_s=t0 + (r.arrival_s - t0) / scale) for r in self.records)
        return self._derived(f"{self.name}@x{scale:g}", scaled)

    def window(self, start_s: float, end_s: float, rebase: bool = True) -> Workload:
        """Requests arriving in ``[start_s, end_s)`` seconds; with ``rebase`` the window's
        start becomes time 0."""
        if end_s <= start_s:
            raise ValueError(f"empty window: end_s={end_s} <= start_s={start_s}")
        shift = start_s if rebase else 0.0
        kept = tuple(
            replace(r, arrival_s=r.arrival_s - shift)
            for r in self.records
            if start_s <= r.arrival_s < end_s
        )
        return self._derived(f"{self.name}[{start_s:g}s,{end_s:g}s)", kept)

    def head(self, n: int) -> Workload:
        """The first ``n`` requests."""
        if n < 0:
            raise ValueError(f"head needs n >= 0, got {n}")
        return self._derived(f"{self.name}[:{n}]", self.records[:n])

    def with_slo_classes(self, classes: Sequence[str | None]) -> Workload:
        """A copy whose records carry the given SLO classes (one per record, in order)."""
        if len(classes) != len(self.records):
            raise ValueError(f"got {len(classes)} SLO classes for {len(self.records)} requests")
        recs = tuple(replace(r, slo_class=c) for r, c in zip(self.records, classes, strict=True))
        return self._derived(self.name, recs)

    def with_block_tokens(self, block_tokens: int) -> Workload:
        """The same requests with ``block_tokens`` tokens per hash-id block instead of
        ``self.block_tokens``: prompt lengths shrink (or grow) by that ratio and keep their
        block structure, so equal hash ids still mean equal blocks.

        A record with ``k`` hash ids has ``k - 1`` full blocks and a last block of ``r`` tokens;
        it gets ``(k - 1) * block_tokens + ceil(r * block_tokens / old)`` tokens (at least 1 in
        the last block), so it still spans exactly ``k`` blocks. This is how a 40k-token
        Mooncake prompt fits a CPU model without losing its prefix sharing.
        """
        old = self.block_tokens
        if old is None:
            raise ValueError(f"workload {self.name!r} has no hash-id blocks to rescale")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if block_tokens == old:
            return self
        recs = tuple(
            replace(r, prompt_tokens=_rescaled_length(r, old, block_tokens)) for r in self.records
        )
        return Workload(f"{self.name}[block={block_tokens}]", recs, self.skipped_rows, block_tokens)

    # ------------------------------------------------------------------ to the scheduler

    def to_requests(
        self,
        slo_config: SLOConfig | None = None,
        id_prefix: str | None = None,
        default_class: str = "text",
    ) -> list[Request]:
        """One ``flowprefill_ray.scheduling.Request`` per record, in arrival order, ids
        ``{id_prefix}-{index}`` (the workload's name by default).

        Records with ``hash_ids`` pass their full blocks' ids on as ``prefix_hashes`` (the
        policy's prefix pricing and routing, the simulator's caches, which must then use the
        workload's ``block_tokens``). Records without an SLO class get ``default_class``. With ``slo_config`` the request's
        ``ttft_slo_s`` (seconds) is fixed from that config (its class targets times its scale);
        without it, the request carries only its class and the policy's own SLO config applies.
        """
        # Imported on use, so that reading a trace does not load the scheduling package.
        from flowprefill_ray.scheduling import Request

        prefix = id_prefix if id_prefix is not None else self.name
        requests = []
        for i, record in enumerate(self.records):
            slo_class = record.slo_class or default_class
            extra = {}
            if slo_config is not None:
                extra["ttft_slo_s"] = slo_config.resolve(slo_class).ttft_slo_s
            if record.hash_ids and self.block_tokens:
                # Full blocks only: a partial last block is never cached (prefix_blocks.py).
                extra["prefix_hashes"] = record.hash_ids[
                    : record.prompt_tokens // self.block_tokens
                ]
            requests.append(
                Request(
                    request_id=f"{prefix}-{i}",
                    arrival_s=record.arrival_s,
                    prompt_tokens=record.prompt_tokens,
                    max_output_tokens=max(1, record.output_tokens),
                    slo_class=slo_class,
                    **extra,
                )
            )
        return requests
