"""Llama-family model with resumable prefill (see docs/ARCHITECTURE.md, section 2)."""

from .checkpoint_sync import SyncMode
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import (
    KVCacheFullError,
    ModelConfigError,
    ModelError,
    PromptTooLongError,
    UnsupportedArchitectureError,
    WeightLoadError,
)
from .kv import KVCache
from .llama import LlamaModel, load_model
from .prefill import Cursor, Granularity, PrefillResult, PrefillState
from .tokenizer import load_tokenizer

# Decode-side exports (paged_kv.py, sampling.py, decode.py, generate.py) are added below once
# those modules exist.

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Cursor",
    "Granularity",
    "KVCache",
    "KVCacheFullError",
    "LlamaModel",
    "ModelConfig",
    "ModelConfigError",
    "ModelError",
    "PrefillResult",
    "PrefillState",
    "PromptTooLongError",
    "SyncMode",
    "UnsupportedArchitectureError",
    "WeightLoadError",
    "load_model",
    "load_tokenizer",
]
