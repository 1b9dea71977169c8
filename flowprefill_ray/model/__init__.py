"""Llama-family model with resumable prefill (see docs/ARCHITECTURE.md, section 2)."""

from .checkpoint_sync import SyncMode
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import (
    KVCacheFullError,
    ModelConfigError,
    ModelError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
    WeightLoadError,
)
from .kv import KVCache
from .llama import LlamaModel, load_model
from .paged_kv import PagedKVCache
from .prefill import Cursor, Granularity, PrefillResult, PrefillState
from .sampling import SamplingParams, sample
from .tokenizer import load_tokenizer

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
    "PagedKVCache",
    "PrefillResult",
    "PrefillState",
    "SequenceTooLongError",
    "SamplingParams",
    "SyncMode",
    "UnsupportedArchitectureError",
    "WeightLoadError",
    "load_model",
    "load_tokenizer",
    "sample",
]
