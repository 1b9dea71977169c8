"""Turning a ``ModelSource`` into a checkpoint directory, a device and a dtype.

Called in every worker process; ``"tiny"`` and ``"default"`` are produced once on disk (under a
file lock in the model package) so concurrent workers share one copy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .config import ModelSource

# Shape of the generated test model: big enough that a prefill has many checkpoints, small
# enough that a CPU test runs in milliseconds.
TINY_MODEL_SHAPE = dict(
    num_layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, max_position=16384
)


def cache_dir(source: ModelSource) -> Path:
    base = source.cache_dir or os.environ.get("FLOWPREFILL_CACHE") or "~/.cache/flowprefill_ray"
    return Path(base).expanduser()


def checkpoint_path(source: ModelSource) -> Path:
    """The checkpoint directory of ``source``, generating or converting it on first use."""
    if source.path == "default":
        from flowprefill_ray.model.checkpoints import default_checkpoint

        return Path(default_checkpoint())
    if source.path == "tiny":
        from flowprefill_ray.model.checkpoints import tiny_checkpoint

        path = cache_dir(source) / "tiny-llama-runtime"
        if not (path / "model.safetensors").is_file():
            # Several workers may start at once: write beside, then rename into place.
            staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tiny_checkpoint(staging, **TINY_MODEL_SHAPE)
            try:
                staging.rename(path)
            except OSError:  # another worker won the race; its copy is identical
                shutil.rmtree(staging, ignore_errors=True)
        return path
    return Path(source.path)


def torch_device(source: ModelSource) -> torch.device:
    if source.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(source.device)


def torch_dtype(source: ModelSource) -> torch.dtype:
    return getattr(torch, source.dtype)
