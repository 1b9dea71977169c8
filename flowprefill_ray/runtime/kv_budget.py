"""A prefill worker's KV memory budget: measured once, after the model is loaded.

The budget is what the worker may fill with KV and paused prefills (``KVMemoryConfig``): on
CUDA a fraction of the device memory free once the weights are in (``torch.cuda.mem_get_info``),
on CPU a configured number of bytes. What a unit costs in it comes from the loaded model:

- KV per prompt token: layers x KV heads x head dim x 2 (keys and values) x dtype size;
- activations per token of a paused forward beyond that KV (hidden states, projections, rope
  tables), measured by pausing a short probe prefill at every checkpoint of the worker's
  granularity: the most it held at one checkpoint, less the probe's full KV;
- per sequence: what a finished forward holds beyond both (the last token's logits).

With the prefix cache on, its ``budget_bytes`` is set aside from the budget first: the cache
and the units then share the worker's memory without exceeding it together.

The scheduler receives the result with the worker's ``adopt`` answer and gives it to the
policy in ``WorkerJoined`` (``flowprefill_ray/scheduling/kv_memory.py`` does the accounting).
"""

from __future__ import annotations

import logging
import math
import random

import torch

from flowprefill_ray.scheduling import KVBudget
from flowprefill_ray.scheduling.events import WorkItem

from .config import KVMemoryConfig

logger = logging.getLogger(__name__)

# Probe length: long enough that per-sequence terms do not swamp the per-token ones.
PROBE_TOKENS = 64


def kv_bytes_per_token(model) -> int:
    """KV bytes one prompt token takes over all layers (keys and values)."""
    config = model.config
    element = torch.empty((), dtype=model.dtype).element_size()
    return config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * element


def budget_bytes(device: torch.device, config: KVMemoryConfig) -> int:
    """The worker's whole budget: call after the weights are loaded and before anything else
    allocates on the device."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_fraction)
    return config.cpu_budget_bytes


def probe_overheads(model, granularity: str, kv_per_token: int) -> tuple[int, int]:
    """``(activation bytes per token, bytes per sequence)`` of a paused and a finished forward,
    from a ``PROBE_TOKENS``-token prefill paused at every checkpoint."""
    rng = random.Random(0)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(PROBE_TOKENS)]
    state = model.start_prefill([tokens], granularity=granularity)
    peak_paused = 0
    while not state.run(lambda: True):
        peak_paused = max(peak_paused, state.nbytes)
    finished = state.nbytes
    kv = PROBE_TOKENS * kv_per_token
    activation = max(0, math.ceil((peak_paused - kv) / PROBE_TOKENS))
    per_sequence = max(0, finished - kv - activation * PROBE_TOKENS)
    return activation, per_sequence


def measure_kv_budget(
    model,
    device: torch.device,
    config: KVMemoryConfig,
    granularity: str,
    chunk_tokens: int,
    reserved_bytes: int = 0,
) -> KVBudget:
    """The worker's ``KVBudget`` (see the module docstring), less ``reserved_bytes`` set
    aside for other KV on the worker (its prefix cache, which keeps itself under them)."""
    measured = budget_bytes(device, config)  # first: the probe's allocations are not ours
    total = measured - reserved_bytes
    if total < 1:
        logger.warning(
            "the prefix cache's %d bytes take all of this worker's KV budget of %d bytes: "
            "units run beyond it (lower prefill.prefix_cache.budget_bytes)",
            reserved_bytes,
            measured,
        )
        total = 1
    kv = kv_bytes_per_token(model)
    activation, per_sequence = probe_overheads(model, granularity, kv)
    budget = KVBudget(
        budget_bytes=total,
        paused_budget_bytes=int(total * config.paused_kv_fraction),
        kv_bytes_per_token=kv,
        activation_bytes_per_token=activation,
        sequence_bytes=per_sequence,
    )
    longest = model.config.context_limit
    need = budget.item_bytes(WorkItem("", 0, longest), chunk_tokens)
    if need > total:
        logger.warning(
            "a %d-token prompt needs %d bytes of KV and activations, more than this worker's "
            "budget of %d bytes: such prompts run beyond it (prefill.kv_memory)",
            longest,
            need,
            total,
        )
    return budget
