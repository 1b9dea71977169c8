"""Linear layers on CPU through oneDNN, on weights packed once when the model loads.

Why: ``F.linear`` on a CPU tensor calls MKL's sgemm, which lays the weight out for its kernel
again on every call (and picks a generic code path on AMD CPUs). vLLM's CPU backend instead
hands oneDNN a weight packed ahead of time; on the 2-core AMD EPYC of our benchmarks its
lone-request TTFT was 1.83x lower than ours at 16 tokens and 1.19x at 384 while our forward
matched transformers' (docs/results/prefill_vs_hf.json). torch ships the same oneDNN path
(the ops its compiler uses for frozen CPU models): ``_reorder_linear_weight`` packs once,
``_linear_pointwise`` multiplies. The packed weight replaces the dense one; the embedding (and
an lm_head tied to it) stays dense, because a lookup needs it.

Memory: oneDNN, and ideep (torch's wrapper around it), keep each multiply's primitive and its
buffers in caches keyed by shape, 1,024 entries each by default, so a process meeting a new
token count with nearly every batch kept growing: prefills of the tiny model at each of 1..399
tokens added 676 MiB (F.linear: 10 MiB). Before the first oneDNN call this module caps both
caches at ``ONEDNN_CACHE_ENTRIES`` (``LRU_CACHE_CAPACITY``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``;
a value already in the environment wins). Capping only one of them still left 404-443 MiB.

Only fp32 on CPU: the dtype a CPU deployment ships with (bf16 SmolLM2 answers wrongly here).
Where torch lacks these ops, or they disagree with ``F.linear`` on a probe, nothing is packed
and every matmul stays ``F.linear``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from .weights import LayerWeights, ModelWeights

# The rows a packed weight is laid out for: a hint (any row count works). vLLM's CPU backend
# picks 32; prefill batches and decode batches both sit near it.
_PACK_ROWS_HINT = 32

# Entries of each shape-keyed cache (module docstring). A forward at one token count uses 4
# primitives (qkv, o_proj, gate_up, down; all layers share them), so the last few token counts
# stay cached: a batch repeated at its size hits, a new size builds its 4 again.
ONEDNN_CACHE_ENTRIES = 16
_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def cap_onednn_caches() -> None:
    """Bound oneDNN's and ideep's primitive caches. Both read their variable when they are
    first used, so this must run before the process's first oneDNN call (it does, from
    ``onednn_linear_available``)."""
    for name in _CACHE_VARIABLES:
        os.environ.setdefault(name, str(ONEDNN_CACHE_ENTRIES))


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's packed linear and it agrees with ``F.linear``."""
    cap_onednn_caches()
    mkldnn = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    ):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator)
    x, bias = torch.randn(5, 40, generator=generator), torch.randn(48, generator=generator)
    try:
        packed = mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT)
        got = linear(x, packed, bias)
    except RuntimeError:
        return False
    return torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias`` for a dense or a packed (``pack_linear_weights``) weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_linear_weights(weights: ModelWeights) -> ModelWeights:
    """The same weights with every decoder layer's matmul weight packed for oneDNN (a new
    ``ModelWeights``; the dense ones are freed once nothing else holds them)."""

    def pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT)

    layers: list[LayerWeights] = [
        dataclasses.replace(
            layer,
            qkv=pack(layer.qkv),
            o_proj=pack(layer.o_proj),
            gate_up=pack(layer.gate_up),
            down=pack(layer.down),
        )
        for layer in weights.layers
    ]
    return dataclasses.replace(weights, layers=layers)


def use_onednn(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device`` in ``dtype`` packs its weights under ``cpu_matmul``
    ``choice`` (``onednn`` or ``torch``)."""
    if choice not in ("onednn", "torch"):
        raise ValueError(f"cpu_matmul must be 'onednn' or 'torch', got {choice!r}")
    return (
        choice == "onednn"
        and device.type == "cpu"
        and dtype == torch.float32
        and onednn_linear_available()
    )
