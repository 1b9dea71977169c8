"""How a prefill worker uses its prefix cache: seed new items from it, fill it from finished ones.

When a unit starts, an item that begins at token 0 looks up its longest cached prefix and
starts with that KV and ``done`` already counted, so only the rest is prefilled (the pause and
resume machinery sees an ordinary item with a prefix, as a later chunk of a long prompt is).
A hit is whole blocks, and never the last prompt token: its logits give the first token.
With prefix routing (``policy.prefix``) the policy itself starts a whole prompt at the prefix
it believes cached on the worker; such an item carries the tokens before its start and runs
here as the prompt from token 0 (``whole_prompt``), so a prefix evicted meanwhile is computed.

When an item completes, the full blocks of everything prefilled so far for its request are
inserted. A long prompt runs as several items (one per unit), each knowing only its own token
ids, so the ids of the earlier items are remembered here until the request's last item.
"""

from __future__ import annotations

import dataclasses
import threading

from flowprefill_ray.model.prefix_cache import PrefixCache

from .messages import PrefillItemSpec
from .prefill_units import ItemProgress


class PrefixReuse:
    """The executor's side of one ``PrefixCache`` (None: caching off, every call a no-op).

    ``share_unsalted``: whether requests without a ``cache_salt`` use the cache at all. With
    False only salted requests are cached, each salt sharing only with itself.
    """

    def __init__(self, cache: PrefixCache | None, share_unsalted: bool = True):
        self.cache = cache
        self.share_unsalted = share_unsalted
        self._lock = threading.Lock()
        # Token ids [0, end) of requests whose earlier items finished here (chunked prompts).
        self._earlier: dict[str, tuple[int, ...]] = {}
        self._reported = (0, 0)  # (query, hit) tokens already handed to ``new_counts``

    def _applies(self, spec: PrefillItemSpec) -> bool:
        return self.cache is not None and (spec.cache_salt is not None or self.share_unsalted)

    def start(self, spec: PrefillItemSpec) -> ItemProgress:
        """The progress of a new item that starts at token 0, seeded from the cache."""
        if not self._applies(spec):
            return ItemProgress(spec)
        # The last prompt token is always computed: its logits give the first token.
        limit = spec.end - spec.start if not spec.is_last else spec.prompt_tokens - 1
        hit = self.cache.lookup(spec.token_ids, spec.cache_salt, max_tokens=limit)
        if hit is None:
            return ItemProgress(spec)
        return ItemProgress(spec, done=hit.tokens, kv=hit.kv, cached_tokens=hit.tokens)

    @staticmethod
    def whole_prompt(spec: PrefillItemSpec) -> PrefillItemSpec:
        """An item the policy started at its cached prefix, as the item from token 0 it is
        for this worker (``spec.prefix_token_ids`` are the tokens before ``spec.start``)."""
        return dataclasses.replace(
            spec,
            start=0,
            token_ids=spec.prefix_token_ids + tuple(spec.token_ids),
            prefix_token_ids=(),
        )

    def finished(self, item: ItemProgress) -> None:
        """``item`` completed: cache the full blocks of its request's prompt so far."""
        spec = item.spec
        if not self._applies(spec) or item.kv is None:
            return
        with self._lock:
            earlier = self._earlier.pop(spec.request_id, ()) if spec.start > 0 else ()
            if spec.start > 0 and len(earlier) != spec.start:
                return  # its first items ran before this worker cached (or elsewhere)
            tokens = earlier + tuple(spec.token_ids)
            if not spec.is_last:
                self._earlier[spec.request_id] = tokens
        self.cache.insert(tokens, item.kv, spec.cache_salt)

    def forget(self, request_id: str) -> None:
        """The request's KV left this worker unfinished (dropped, failed, reset)."""
        with self._lock:
            self._earlier.pop(request_id, None)

    def reset(self) -> None:
        """A new scheduler adopted the worker: no chunked prompt continues here. The cached
        blocks stay: they are keyed by tokens, not by anything the old scheduler named."""
        with self._lock:
            self._earlier.clear()

    def new_counts(self) -> tuple[int, int]:
        """(query, hit) tokens since the last call: the increments of the metric counters."""
        if self.cache is None:
            return 0, 0
        stats = self.cache.stats()
        with self._lock:
            last_query, last_hit = self._reported
            self._reported = (stats["query_tokens"], stats["hit_tokens"])
        return stats["query_tokens"] - last_query, stats["hit_tokens"] - last_hit

    def stats(self) -> dict | None:
        if self.cache is None:
            return None
        return {**self.cache.stats(), "share_unsalted": self.share_unsalted}
