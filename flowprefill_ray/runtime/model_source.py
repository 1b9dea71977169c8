"""Turning a ``ModelSource`` into a checkpoint directory, a device, a dtype and a model.

Called in every worker process; ``"tiny"`` and ``"default"`` are produced once on disk (under a
file lock in the model package) so concurrent workers share one copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flowprefill_ray.model.checkpoints import TINY_MODEL_SHAPE, cached_tiny_checkpoint

from .config import ModelSource

__all__ = [
    "TINY_MODEL_SHAPE",
    "cache_dir",
    "checkpoint_path",
    "load_source_model",
    "torch_device",
    "torch_dtype",
]


def cache_dir(source: ModelSource) -> Path:
    base = source.cache_dir or os.environ.get("FLOWPREFILL_CACHE") or "~/.cache/flowprefill_ray"
    return Path(base).expanduser()


def checkpoint_path(source: ModelSource) -> Path:
    """The checkpoint directory of ``source``, generating or converting it on first use."""
    if source.path == "default":
        from flowprefill_ray.model.checkpoints import default_checkpoint

        return Path(default_checkpoint())
    if source.path == "tiny":
        # Several workers may start at once; the cache write is atomic.
        return cached_tiny_checkpoint(cache_dir(source) / "tiny-llama-runtime", **TINY_MODEL_SHAPE)
    return Path(source.path)


def torch_device(source: ModelSource) -> torch.device:
    if source.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(source.device)


def torch_dtype(source: ModelSource) -> torch.dtype:
    return getattr(torch, source.dtype)


def load_source_model(source: ModelSource, path: Path | None = None):
    """The model ``source`` names, loaded as every worker runs it (device, dtype, kernels and
    CPU matmul backend all from ``source``). ``path``: its ``checkpoint_path``, if known."""
    from flowprefill_ray.model import load_model

    return load_model(
        path or checkpoint_path(source),
        device=torch_device(source),
        dtype=torch_dtype(source),
        kernels=source.kernels,
        cpu_matmul=source.cpu_matmul,
    )
