"""The simulated workers' prefix caches: what each worker really holds, as opposed to the
policy's view of it (``scheduling/prefix_routing.py``).

A finished prompt's full blocks enter its worker's cache (LRU, ``prefix_cache_blocks`` per
worker). A unit item that starts past token 0 with no earlier chunk on the worker is a prefix
hit the policy counted on; if the cache no longer holds that much (evicted meanwhile, or the
policy's view was wrong), the worker recomputes from where its cache really ends, as a live
worker does, and the simulator charges that compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowprefill_ray.scheduling.prefix_blocks import BlockLRU, reusable_tokens

if TYPE_CHECKING:
    from flowprefill_ray.scheduling.request import Request


class SimulatedPrefixCaches:
    def __init__(self, worker_ids: list[str], capacity_blocks: int, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._caches = {w: BlockLRU(capacity_blocks) for w in worker_ids}
        self.hit_tokens = 0  # prompt tokens served from a cache
        self.recomputed_tokens = 0  # tokens the policy counted as cached but were not

    def start(self, worker_id: str, request: Request, start: int) -> int:
        """Where a prefix item the policy starts at ``start`` really starts on ``worker_id``."""
        cache = self._caches[worker_id]
        cached = reusable_tokens(
            cache.cached_blocks(request.prefix_hashes), self.block_tokens, request.prompt_tokens
        )
        real = min(cached, start)
        self.hit_tokens += real
        self.recomputed_tokens += start - real
        return real

    def store(self, worker_id: str, request: Request) -> None:
        """``request``'s whole prompt was prefilled on ``worker_id``."""
        full = request.prompt_tokens // self.block_tokens
        self._caches[worker_id].insert(request.prefix_hashes[:full])

    def cached_blocks(self, worker_id: str) -> int:
        return len(self._caches[worker_id])
