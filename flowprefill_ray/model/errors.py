"""Errors raised by the model layer. Each message names the offending value and what was expected."""


class ModelError(Exception):
    """Base class of every error the model layer raises on purpose."""


class UnsupportedArchitectureError(ModelError):
    """The checkpoint's `architectures` entry is not one this model implements."""


class ModelConfigError(ModelError):
    """A `config.json` is missing, unreadable, or has an invalid field."""


class WeightLoadError(ModelError):
    """A weight tensor is missing from the checkpoint or has the wrong shape."""


class PromptTooLongError(ModelError):
    """A prompt (plus its KV prefix) is longer than `max_position_embeddings` tokens."""


class KVCacheFullError(ModelError):
    """The paged KV cache has no free block left for a sequence."""
