"""Errors raised by the model layer. Each message names the offending value and what was expected."""


class ModelError(Exception):
    """Base class of every error the model layer raises on purpose."""


class UnsupportedArchitectureError(ModelError):
    """The checkpoint's `architectures` entry is not one this model implements."""


class ModelConfigError(ModelError):
    """A `config.json` is missing, unreadable, or has an invalid field."""


class WeightLoadError(ModelError):
    """A weight tensor is missing from the checkpoint or has the wrong shape."""


class SequenceTooLongError(ModelError):
    """A sequence is longer than the model can attend over: a prompt plus its KV prefix, or a
    sequence being decoded, passes `max_position_embeddings` (or a sliding window, which is not
    implemented). Not the runtime's `PromptTooLongError`, which is the engine's own prompt bound
    (`max_prompt_tokens`, checked before anything reaches a model) and answers HTTP 413."""


class KVCacheFullError(ModelError):
    """The paged KV cache has no free block left for a sequence."""
